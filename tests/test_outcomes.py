"""Outcomes of isolated tests look exactly like a plain run's: reports, sections, -x, --lf, JUnit."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from conftest import Runner

SUITE = """
import logging, os, signal, warnings, pytest

@pytest.fixture
def broken_setup():
    raise RuntimeError("setup exploded")

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown exploded")

pytestmark = pytest.mark.isolated

def test_pass():
    pass

def test_fail_rewritten():
    value = [1, 2, 3]
    assert value == [1, 2, 4]

def test_skip_inside():
    pytest.skip("skipped from inside")

@pytest.mark.skip(reason="marked skip")
def test_skip_marker():
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="fixed already")
def test_xpass():
    pass

def test_setup_error(broken_setup):
    pass

def test_teardown_error(broken_teardown):
    pass

def test_output_sections():
    print("to stdout")
    os.write(2, b"to stderr fd\\n")
    logging.getLogger("x").warning("logged line")
    assert False

def test_warning_recorded():
    warnings.warn("a user warning", UserWarning)

def test_record_property(record_property):
    record_property("answer", 42)
"""


def test_outcomes_match_plain_pytest(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(SUITE)
    xml = pytester.path / "junit.xml"
    result = run("-rA", "-W", "default::UserWarning", f"--junitxml={xml}", "-o", "junit_family=xunit1")
    result.assert_outcomes(passed=4, failed=2, skipped=2, xfailed=1, xpassed=1, errors=2, warnings=1)
    result.stdout.fnmatch_lines(["*RuntimeError: setup exploded*", "*RuntimeError: teardown exploded*"])
    result.stdout.fnmatch_lines(["*def test_fail_rewritten():*", "E*assert ?1, 2, 3? == ?1, 2, 4?", "*At index 2 diff: 3 != 4*"])
    result.stdout.fnmatch_lines(
        [
            "*Captured stdout call*", "to stdout",
            "*Captured stderr call*", "to stderr fd",
            "*Captured log call*", "*logged line*",
        ]
    )
    result.stdout.fnmatch_lines(["*UserWarning: a user warning*"])
    result.stdout.fnmatch_lines(["SKIPPED * skipped from inside", "SKIPPED * marked skip"], consecutive=False)
    props = {p.get("name"): p.get("value") for p in ET.parse(xml).getroot().iter("property")}
    assert props["answer"] == "42"
    # The same suite without the plugin gives the same JUnit verdict for every test case.
    plain_xml = pytester.path / "plain.xml"
    plain = pytester.runpytest_subprocess(
        "-p", "no:isolate", "-W", "default::UserWarning", "-W", "ignore::pytest.PytestUnknownMarkWarning",
        f"--junitxml={plain_xml}", "-o", "junit_family=xunit1",
    )
    assert plain.parseoutcomes() == result.parseoutcomes()
    assert _junit_verdicts(plain_xml) == _junit_verdicts(xml)


def _junit_verdicts(path: object) -> list[tuple[str, list[str]]]:
    cases = ET.parse(str(path)).getroot().iter("testcase")
    return sorted((str(c.get("name")), sorted(child.tag for child in c if child.tag != "properties")) for c in cases)


def test_crashes_fail_with_a_name_and_the_run_continues(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        """
        import ctypes, os, signal, sys, pytest
        pytestmark = pytest.mark.isolated

        def test_segv():
            print("before the crash")
            sys.stdout.flush()
            ctypes.string_at(0)

        def test_abort():
            os.abort()

        def test_exit_code():
            os._exit(3)

        def test_sigkill():
            os.kill(os.getpid(), signal.SIGKILL)

        def test_still_runs():
            pass
        """
    )
    result = run("-rA")
    result.assert_outcomes(failed=4, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_segv*crashed with SIGSEGV (signal 11) (during call)*",
            "*Captured stdout call*", "before the crash",
            "*test_abort*crashed with SIGABRT (signal 6)*",
            "*test_exit_code*exited with status 3*",
            "*test_sigkill*crashed with SIGKILL (signal 9)*",
        ]
    )


def test_exitfirst_and_last_failed(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.isolated
        def test_a(): pass
        def test_b(): assert 0
        def test_c(): pass
        """
    )
    result = pytester.runpytest_subprocess("-x")
    result.assert_outcomes(passed=1, failed=1)
    result = pytester.runpytest_subprocess("--lf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*run-last-failure: rerun previous 1 failure*"])
