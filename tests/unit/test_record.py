"""The factory's frozen records behave like frozen dataclasses, and keep heavy modules out of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_isolate.linux.mounts import Step
from pytest_isolate.linux.record import asdict
from pytest_isolate.linux.rootfs import RootOptions


def test_fields_defaults_equality_hash_repr() -> None:
    a = Step("overlay", "/usr")
    assert (a.action, a.path, a.target) == ("overlay", "/usr", "")
    assert a == Step(action="overlay", path="/usr", target="")
    assert a != Step("overlay", "/usr", "/x")
    assert a.__eq__(("overlay", "/usr", "")) is NotImplemented  # a record equals records of its class only
    assert hash(a) == hash(Step("overlay", "/usr"))
    assert repr(a) == "Step(action='overlay', path='/usr', target='')"


def test_frozen_and_strict_arguments() -> None:
    a = Step("dir", "/tmp")
    with pytest.raises(AttributeError):
        a.path = "/etc"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Step("dir")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Step("dir", "/tmp", bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Step("dir", "/tmp", "", "extra")  # type: ignore[call-arg]


def test_asdict_recurses_like_dataclasses() -> None:
    opts = RootOptions(steps=(Step("rootlayer", "/"),), writable=("/tmp/x",), binds=(("/a", "/b"),))
    data = asdict(opts)
    assert data["steps"] == ({"action": "rootlayer", "path": "/", "target": ""},)
    assert data["binds"] == (("/a", "/b"),) and data["scratch_size"] == "50%"


def test_factory_process_imports_no_typing_or_dataclasses() -> None:
    """Every MB of the factory costs each isolated test CPU (see linux/record.py)."""
    parent = str(Path(__file__).resolve().parents[2])
    code = (f"import sys; sys.path.insert(0, {parent!r}); import pytest_isolate.engine.factory; "
            "print(sorted(m for m in ('typing', 'dataclasses', 'inspect', 'ast') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
