"""The documentation names everything the plugin registers, and builds with warnings as errors.

Nothing here forks or unshares in this process: the option names come from the plugin's own
``pytest_addoption`` run against a recording parser, and Sphinx runs in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.engine.accounting import PROPERTY
from pytest_isolate.plugin import hooks
from pytest_isolate.plugin.marker import MARKER_ARGS
from pytest_isolate.plugin.options import LIMITS, env_name

DOCS = Path(__file__).resolve().parent.parent / "docs"
REFERENCE = DOCS / "reference.rst"


class RecordingParser:
    """Stands in for pytest's parser (and its option groups): records every name registered."""

    def __init__(self) -> None:
        self.options: list[str] = []
        self.ini_keys: list[str] = []

    def getgroup(self, name: str, description: str = "") -> RecordingParser:
        return self

    def addoption(self, *names: str, **kwargs: Any) -> None:
        self.options.extend(name for name in names if name.startswith("--"))

    def addini(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.ini_keys.append(name)


@pytest.fixture(scope="module")
def registered() -> RecordingParser:
    parser = RecordingParser()
    hooks.pytest_addoption(parser)  # type: ignore[arg-type]
    return parser


@pytest.fixture(scope="module")
def reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def _missing(names: list[str], text: str) -> list[str]:
    return [name for name in names if f"``{name}``" not in text]


def test_every_option_is_in_the_reference(registered: RecordingParser, reference: str) -> None:
    options = [name for name in registered.options if name.startswith("--isolate")]
    assert "--isolate" in options and len(options) > 1, registered.options
    assert _missing(options, reference) == []


def test_every_ini_key_is_in_the_reference(registered: RecordingParser, reference: str) -> None:
    keys = [name for name in registered.ini_keys if name.startswith("isolate_")]
    assert {f"isolate_{name}" for name in LIMITS} <= set(keys)
    assert _missing(keys, reference) == []


def test_every_environment_variable_is_in_the_reference(reference: str) -> None:
    names = [env_name(name) for name in (*LIMITS, "unavailable", "cgroups", "overlap")] + ["PYTEST_ISOLATE_MUST_WORK",
                                                                                 "PYTEST_ISOLATE_CACHE"]
    assert _missing(names, reference) == []


def test_every_marker_argument_is_in_the_reference(reference: str) -> None:
    assert _missing(list(MARKER_ARGS), reference) == []


def test_every_junit_property_is_in_the_reference(reference: str) -> None:
    names = [f"isolate.{name}" for name in PROPERTY.values()] + ["isolate.sources"]
    assert _missing(names, reference) == []


def _public_methods(cls: type) -> list[str]:
    return [name for name in vars(cls) if not name.startswith("_") and callable(getattr(cls, name, None))]


def test_every_sandbox_api_name_is_in_the_reference(reference: str) -> None:
    """The library's public names, every option of run/popen/call, and every public method."""
    import pytest_isolate
    from pytest_isolate.engine.network import Network
    from pytest_isolate.engine.process import SandboxProcess
    from pytest_isolate.engine.sandbox import RUN_OPTIONS, Sandbox, SandboxResult

    names = [n for n in pytest_isolate.__all__ if not n.startswith("_")] + list(RUN_OPTIONS)
    assert _missing(names, reference) == []
    methods = [f"{cls.__name__}.{m}" for cls in (Sandbox, Network) for m in _public_methods(cls)]
    assert [m for m in methods if m not in reference] == []
    fields = ["args", "returncode", "exit_code", "signal", "stdout", "stderr", "timed_out", "oom_killed", "usage",
              "check_returncode()"] + [f"{m}(" for m in _public_methods(SandboxProcess)]
    assert _missing([f.rstrip("(") for f in fields if not f.endswith("(")], reference) == []
    assert [f for f in fields if f.endswith("(") and f"``{f}" not in reference] == []
    assert "sandbox" in reference and "``sandbox`` fixture" in reference
    assert SandboxResult.__doc__


def test_docs_build_with_warnings_as_errors(tmp_path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a dependency's import-time warning is not ours to fail on
            import sphinx  # noqa: F401
    except ImportError:
        pytest.skip("sphinx not installed")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-b", "html", str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, f"sphinx -W failed:\n{result.stdout}\n{result.stderr}"
