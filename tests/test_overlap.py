"""Overlapping tests: the next isolated test's process starts while this one's reports are logged.

What a test sees must not change with it: its own warning filters, its own protocol wrappers, no
run at all after ``-x`` stops the session, and nothing left behind when the session stops while
a test started early is running.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from conftest import Runner, interrupt_once_started, processes_with

# The conftest counts, in the pytest process, the reports logged for test_a; test_b writes down how
# many its process saw: a copy of the pytest process forked before they were logged sees none. (A
# module's first test does not overlap the next: its setup phase runs in the pytest process too.)
COUNTING = {
    "conftest.py": """
        LOGGED = []

        def pytest_runtest_logreport(report):
            LOGGED.append(report.nodeid)
    """,
    "test_count.py": """
        import json, os, pytest
        import conftest

        pytestmark = pytest.mark.isolated(writable=[os.getcwd()])

        def test_first():  # the module's first test: its setup runs in the pytest process too
            pass

        def test_a():
            pass

        def test_b():
            seen = sum(1 for nodeid in conftest.LOGGED if nodeid.endswith("test_a"))
            with open("seen.json", "w") as f:
                json.dump(seen, f)
    """,
}


def _seen(pytester: pytest.Pytester, run: Runner, *args: str) -> int:
    pytester.makeconftest(COUNTING["conftest.py"])
    pytester.makepyfile(test_count=COUNTING["test_count.py"])
    run(*args).assert_outcomes(passed=3)
    return int(json.loads((pytester.path / "seen.json").read_text()))


def test_next_test_starts_before_the_reports_before_it_are_logged(pytester: pytest.Pytester, run: Runner) -> None:
    assert _seen(pytester, run) == 0


@pytest.mark.parametrize("how", ["--isolate-overlap=off", "ini", "env"])
def test_overlap_off_runs_one_test_after_the_other(pytester: pytest.Pytester, run: Runner, how: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    args: tuple[str, ...] = ()
    if how == "ini":
        pytester.makeini("[pytest]\nisolate_overlap = off\n")
    elif how == "env":
        monkeypatch.setenv("PYTEST_ISOLATE_OVERLAP", "off")
    else:
        args = (how,)
    assert _seen(pytester, run, *args) == 3  # setup, call and teardown of test_a


def test_a_wrong_overlap_value_is_a_usage_error(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isolate-overlap=sometimes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--isolate-overlap*invalid choice*sometimes*"])


def test_each_test_has_its_own_warning_filters(pytester: pytest.Pytester, isolation_works: None) -> None:
    pytester.makepyfile(
        """
        import warnings, pytest

        pytestmark = pytest.mark.isolated

        def test_plain_before():
            warnings.warn("plain before", UserWarning)

        @pytest.mark.filterwarnings("error::UserWarning")
        def test_errors():
            with pytest.raises(UserWarning):
                warnings.warn("an error here", UserWarning)

        def test_plain_after():
            warnings.warn("plain after", UserWarning)

        @pytest.mark.filterwarnings("ignore::UserWarning")
        def test_ignores():
            warnings.warn("ignored here", UserWarning)

        def test_plain_last():
            warnings.warn("plain last", UserWarning)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, warnings=3)
    result.stdout.fnmatch_lines(["*plain before*", "*plain after*", "*plain last*"])
    assert "ignored here" not in result.stdout.str()


def test_a_plugin_wrapping_each_test_turns_overlap_off(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makeconftest(
        """
        import os, pytest

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(item):
            os.environ["CURRENT_TEST"] = item.name
            yield
        """
    )
    pytester.makepyfile(
        """
        import os, pytest

        pytestmark = pytest.mark.isolated

        @pytest.mark.parametrize("i", range(6))
        def test_sees_its_own_name(request, i):
            assert os.environ["CURRENT_TEST"] == request.node.name
        """
    )
    run().assert_outcomes(passed=6)


def test_after_a_failure_with_x_nothing_else_runs(pytester: pytest.Pytester, run: Runner) -> None:
    marks = pytester.path / "ran"
    marks.mkdir()
    pytester.makepyfile(
        f"""
        import pytest

        pytestmark = pytest.mark.isolated(writable=[{str(marks)!r}])

        @pytest.mark.parametrize("i", range(4))
        def test_step(i):
            open({str(marks)!r} + f"/{{i}}", "w").close()
            assert i != 1
        """
    )
    result = run("-x")
    result.assert_outcomes(passed=1, failed=1)
    assert sorted(p.name for p in marks.iterdir()) == ["0", "1"]


def test_a_session_stopped_after_a_pass_kills_the_test_started_early(pytester: pytest.Pytester, run: Runner) -> None:
    token = uuid.uuid4().hex
    pytester.makeconftest(
        """
        SESSION = []

        def pytest_sessionstart(session):
            SESSION.append(session)

        def pytest_runtest_logreport(report):
            if report.when == "call" and report.nodeid.endswith("test_first"):
                SESSION[0].shouldstop = "stopped by the conftest"
        """
    )
    pytester.makepyfile(
        f"""
        import subprocess, sys, time, pytest

        pytestmark = pytest.mark.isolated
        KEEP = []

        def test_first():
            pass

        def test_second():
            KEEP.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{token}"]))
            time.sleep(600)
        """
    )
    began = time.monotonic()
    result = run()
    assert time.monotonic() - began < 60
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*stopped by the conftest*"])
    assert "test_second" not in result.stdout.str()
    time.sleep(0.2)
    assert processes_with(token) == []


def test_ctrl_c_while_a_test_started_early_runs_leaves_nothing(pytester: pytest.Pytester, isolation_works: None) -> None:
    token = uuid.uuid4().hex
    started = pytester.path / "started"
    pytester.makepyfile(
        f"""
        import subprocess, sys, time, pytest

        pytestmark = pytest.mark.isolated(writable=[{str(pytester.path)!r}])
        KEEP = []

        @pytest.mark.parametrize("i", range(20))
        def test_quick(i):
            pass

        def test_hangs():
            KEEP.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{token}"]))
            open({str(started)!r}, "w").close()
            time.sleep(600)
        """
    )
    out, status = interrupt_once_started(pytester, started)
    assert b"KeyboardInterrupt" in out, out.decode()
    assert status == pytest.ExitCode.INTERRUPTED
    assert b"20 passed" in out, out.decode()
    assert processes_with(token) == []
