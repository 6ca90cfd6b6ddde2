"""Nothing leaks: no process, mount or namespace outlives a test, even daemons or a Ctrl-C."""

from __future__ import annotations

import uuid

import pytest

from conftest import Runner, interrupt_once_started, processes_with


def _overlay_mounts() -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(" - overlay " in line for line in f)


def test_daemons_die_with_the_test(pytester: pytest.Pytester, run: Runner) -> None:
    token = uuid.uuid4().hex
    pytester.makepyfile(
        f"""
        import os, subprocess, sys, pytest
        KEEP = []

        @pytest.mark.isolated
        def test_daemonize():
            # double fork + setsid: the classic escape from a process tree
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execvp(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", "{token}"])
                os._exit(0)
            KEEP.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{token}"], start_new_session=True))
        """
    )
    before = _overlay_mounts()
    run().assert_outcomes(passed=1)
    assert processes_with(token) == []
    assert _overlay_mounts() == before


def test_ctrl_c_mid_test_kills_the_sandbox(pytester: pytest.Pytester, isolation_works: None) -> None:
    token = uuid.uuid4().hex
    started = pytester.path / "started"
    pytester.makepyfile(
        f"""
        import subprocess, sys, time, pytest
        KEEP = []

        @pytest.mark.isolated(writable=[{str(pytester.path)!r}])
        def test_hangs():
            KEEP.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{token}"]))
            open({str(started)!r}, "w").close()
            time.sleep(600)
        """
    )
    def sleeping() -> None:
        assert processes_with(token), "the sandbox's sleep should be running"

    out, status = interrupt_once_started(pytester, started, sleeping)
    assert b"KeyboardInterrupt" in out, out.decode()
    assert status == pytest.ExitCode.INTERRUPTED
    assert processes_with(token) == []
