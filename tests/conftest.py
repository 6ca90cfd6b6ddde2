"""Shared fixtures: run pytest in a subprocess with the plugin, skip (or fail) on a missing feature.

The suite never forks, unshares or mounts in its own process: every isolation happens in a
``pytester.runpytest_subprocess`` child. ``PYTEST_ISOLATE_MUST_WORK=1`` (set by CI) turns a skip for a
missing kernel feature into a failure, so nothing important is silently skipped on our machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import pytest

MUST_WORK = os.environ.get("PYTEST_ISOLATE_MUST_WORK") == "1"
ROOT = os.getuid() == 0


@pytest.fixture(scope="session")
def host_caps() -> dict[str, Any]:
    """The doctor's JSON for this host, probed in a subprocess."""
    out = subprocess.run([sys.executable, "-m", "pytest_isolate", "doctor", "--json"], capture_output=True, text=True, check=False)
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def need(condition: bool, feature: str) -> None:
    """Skip naming the missing feature, or fail when the must-work switch is on."""
    if condition:
        return
    if MUST_WORK:
        pytest.fail(f"{feature} is required here (PYTEST_ISOLATE_MUST_WORK=1) but missing")
    pytest.skip(f"host lacks {feature}")


@pytest.fixture
def isolation_works(host_caps: dict[str, Any]) -> None:
    missing = [f["name"] for f in host_caps["features"] if f["required"] and not f["ok"]]
    need(not missing, ", ".join(missing) or "isolation")


Runner = Callable[..., pytest.RunResult]


@pytest.fixture
def run(pytester: pytest.Pytester, isolation_works: None) -> Runner:
    """``runpytest_subprocess`` with warnings as errors and a bound on time."""

    def run(*args: str, timeout: float = 120) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider", *args, timeout=timeout)

    return run


def feature_ok(host_caps: dict[str, Any], name: str) -> bool:
    """Whether the doctor found feature ``name`` (it must report it) usable here."""
    return bool(next(f for f in host_caps["features"] if f["name"] == name)["ok"])


@pytest.fixture
def cgroups_ok(host_caps: dict[str, Any]) -> bool:
    """Whether limits can be enforced here; where not (rootless on cgroup v1), the refusal is tested."""
    return feature_ok(host_caps, "cgroup limits")


def assembled(source: Any, tmp_path: Any) -> bytes:
    """The .text of an assembly ``source`` of ours (``as --64``, ``objcopy -O binary``): what its
    module's hex must be. Skips where binutils are missing (a check of our source, not of the host)."""
    import shutil

    if not (shutil.which("as") and shutil.which("objcopy")):
        pytest.skip("binutils (as, objcopy) are not installed: apt-get install binutils")
    obj, raw = tmp_path / "code.o", tmp_path / "code.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    return bytes(raw.read_bytes())


def read_json(path: Any) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    return data


def processes_with(token: str) -> list[Any]:
    """Every process whose command line contains ``token`` (a sleeper a test left behind)."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])]


def interrupt_once_started(pytester: pytest.Pytester, started: Any, check: Callable[[], None] = lambda: None) -> tuple[bytes, int]:
    """Run pytest in ``pytester``'s directory, send it SIGINT (Ctrl-C) once file ``started``
    exists (after ``check()``), and return its output and exit status."""
    import signal
    import time

    # SIGINT back to its default first: a shell without job control starts background commands
    # with it ignored, and Python installs its KeyboardInterrupt handler only over the default
    start = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", start, sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
                            cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline, "the isolated test never started"
            time.sleep(0.05)
        check()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)  # the sandbox's processes: killed, maybe not yet reaped
    return out, proc.returncode
