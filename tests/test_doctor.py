"""``python -m pytest_isolate doctor``: a table with a verdict, JSON for machines, exit status."""

from __future__ import annotations

import json
import subprocess
import sys


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_isolate", "doctor", *args], capture_output=True, text=True, check=False)


def test_doctor_table_and_exit_status() -> None:
    result = _doctor()
    assert "pytest-isolate doctor: kernel" in result.stdout
    for feature in ("user namespace", "mount namespace", "PID namespace", "network namespace", "fresh /proc", "overlay mount"):
        assert feature in result.stdout
    full = "verdict: full isolation is available" in result.stdout
    assert result.returncode == (0 if full else 1)
    if not full:
        assert "fix:" in result.stdout


def test_doctor_json_matches_the_table() -> None:
    data = json.loads(_doctor("--json").stdout)
    assert {"root", "kernel", "features", "full"} <= set(data)
    for feature in data["features"]:
        assert {"name", "ok", "detail", "required"} <= set(feature)
        if not feature["ok"]:
            assert feature["fix"]


def test_one_child_probe_finds_what_a_child_per_feature_finds() -> None:
    """The probe tries everything in one child where the host allows every namespace: the features,
    their verdicts and details must be those of trying each in a child of its own, and of that
    child started early (as the plugin does, before conftest files load) and read later."""
    code = (
        "import json\n"
        "from pytest_isolate.linux.probe import probe, start\n"
        "early = start()\n"
        "runs = [probe(one_by_one=b).features for b in (False, True)] + [probe(started=early).features]\n"
        "print(json.dumps([[repr(f) for f in features] for features in runs]))\n"
    )
    together, apart, early = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                       check=True).stdout)
    assert together == apart == early
