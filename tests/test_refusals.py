"""Where isolation cannot be had, every path refuses with the cause and the fix — tested for real.

These tests need a host that *lacks* a feature: the project's CI runs them in the cgroup-v2 VM with
``--no-userns`` (user.max_user_namespaces=0) and in a Docker container with Docker's default
profile. On a host where isolation works they skip, saying so: that is the other cell, covered by
the rest of the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest


def _doctor() -> tuple[int, str, dict[str, Any]]:
    table = subprocess.run([sys.executable, "-m", "pytest_isolate", "doctor"], capture_output=True, text=True, check=False)
    data = json.loads(subprocess.run([sys.executable, "-m", "pytest_isolate", "doctor", "--json"],
                                     capture_output=True, text=True, check=False).stdout)
    return table.returncode, table.stdout, data


@pytest.fixture(scope="module")
def refused() -> tuple[int, str, dict[str, Any]]:
    code, text, data = _doctor()
    if data["full"]:
        pytest.skip("isolation works on this host; the refusal cells run in the --no-userns VM and in Docker")
    return code, text, data


def test_doctor_names_the_cause_and_the_fix(refused: tuple[int, str, dict[str, Any]]) -> None:
    code, text, data = refused
    assert code == 1
    assert "verdict: full isolation is NOT available; missing:" in text
    missing = [f for f in data["features"] if f["required"] and not f["ok"]]
    assert missing
    for feature in missing:
        assert feature["why"] and feature["fix"], feature
        assert f"{feature['name']}" in text
    assert any(word in text for word in ("sysctl", "--security-opt", "systempaths", "--privileged")), text


@pytest.mark.parametrize(
    ("policy", "outcome"),
    [(None, {"errors": 1}), ("skip", {"skipped": 1}), ("degrade", {"passed": 1, "warnings": 1})],
)
def test_policy_when_isolation_is_unavailable(pytester: pytest.Pytester, refused: Any, policy: Any, outcome: dict[str, int]) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated
        def test_wants_a_sandbox():
            pass
        """
    )
    args = ["-p", "no:cacheprovider", "-rs", "-W", "default::pytest.PytestWarning"]
    if policy:
        args.append(f"--isolate-unavailable={policy}")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(**outcome)
    if policy is None:
        result.stdout.fnmatch_lines(["*pytest-isolate: isolation is not available on this host (missing: *)*doctor*",
                                     "*--isolate-unavailable=skip or =degrade*"])
    elif policy == "skip":
        result.stdout.fnmatch_lines(["SKIPPED*pytest-isolate: isolation is not available on this host*"])
    else:
        result.stdout.fnmatch_lines(["*IsolationDegradedWarning*isolation is not available*running with less isolation*"])
    result.stdout.fnmatch_lines(["isolate: *NOT available here (missing: *)*doctor*"])


@pytest.mark.parametrize(("policy", "outcome"), [(None, {"failed": 1}), ("skip", {"skipped": 1})])
def test_sandbox_api_refuses_with_cause_and_fix(pytester: pytest.Pytester, refused: Any, policy: Any,
                                                outcome: dict[str, int]) -> None:
    pytester.makepyfile(
        """
        def test_runs_a_program(sandbox):
            sandbox.run(["true"])
        """
    )
    args = ["-p", "no:cacheprovider", "-rs"] + ([f"--isolate-unavailable={policy}"] if policy else [])
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(**outcome)
    lines = ["*pytest-isolate could not build the sandbox: step *", "*cause: *", "*fix: *"]
    if policy is None:
        result.stdout.fnmatch_lines(["*IsolationUnavailable*"] + lines)
    else:
        result.stdout.fnmatch_lines(["SKIPPED*pytest-isolate could not build the sandbox*"])
