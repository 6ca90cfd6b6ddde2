"""Fixture semantics: function scope inside the sandbox, broader scopes once in the pytest process."""

from __future__ import annotations

import pytest

from conftest import Runner


def test_scopes_split_between_pytest_and_sandbox(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makeconftest(
        """
        import os, pytest
        EVENTS = os.path.join(os.path.dirname(__file__), "events.txt")

        def log(what):
            with open(EVENTS, "a") as f:   # the pytester dir is under the bound basetemp
                f.write(f"{what} pid={'sandbox' if os.getpid() == 2 else 'pytest'}\\n")

        @pytest.fixture(scope="session")
        def session_fix():
            log("session setup"); yield; log("session teardown")

        @pytest.fixture(scope="module")
        def module_fix(session_fix):
            log("module setup"); yield os.getpid(); log("module teardown")

        @pytest.fixture
        def function_fix(module_fix):
            log("function setup"); yield os.getpid(); log("function teardown")
        """
    )
    here = str(pytester.path)
    pytester.makepyfile(
        test_one=f"""
        import os, pytest

        @pytest.mark.isolated(writable=[{here!r}])
        class TestClassMarker:
            def test_a(self, function_fix, module_fix):
                assert function_fix == 2 and module_fix != 2

            def test_b(self, function_fix):
                assert os.getpid() == 2

        def test_plain(function_fix):
            assert os.getpid() != 2
        """,
        test_two=f"""
        import os, pytest
        pytestmark = pytest.mark.isolated(writable=[{here!r}])

        def setup_module(module):
            module.SETUP_PID = os.getpid()

        def test_module_marker(function_fix):
            assert os.getpid() == 2 and SETUP_PID != 2
        """,
    )
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=4)
    events = (pytester.path / "events.txt").read_text().splitlines()
    assert events == [
        "session setup pid=pytest",
        "module setup pid=pytest",
        "function setup pid=sandbox",
        "function teardown pid=sandbox",
        "function setup pid=sandbox",
        "function teardown pid=sandbox",
        "function setup pid=pytest",
        "function teardown pid=pytest",
        "module teardown pid=pytest",
        "module setup pid=pytest",
        "function setup pid=sandbox",
        "function teardown pid=sandbox",
        "module teardown pid=pytest",
        "session teardown pid=pytest",
    ]


def test_isolate_option_isolates_every_test(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        """
        import os
        def test_one(): assert os.getpid() == 2
        def test_two(): assert os.getpid() == 2
        """
    )
    run("--isolate").assert_outcomes(passed=2)


def test_no_deprecation_warning_for_higher_scoped_fixtures(pytester: pytest.Pytester, run: Runner) -> None:
    """pytest 9.2 warns on getfixturevalue for an inactive item; -W error makes that fail."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="module", params=[1, 2])
        def param_mod(request):
            return request.param

        @pytest.mark.isolated
        def test_param(param_mod, request):
            assert request.getfixturevalue("param_mod") == param_mod
        """
    )
    run("-W", "error").assert_outcomes(passed=2)


def test_exitfirst_tears_down_module_fixture_in_the_failing_test(pytester: pytest.Pytester, run: Runner) -> None:
    """The pytest process skips its setup and teardown phases when they have nothing to do (the
    module fixture exists, the next test needs it); when -x then stops the run after a failure, the
    module fixture is torn down in that test's teardown, as without isolation."""
    pytester.makepyfile(
        """
        import logging, pytest

        @pytest.fixture(scope="module")
        def resource():
            yield
            print("module fixture torn down")

        @pytest.mark.isolated
        def test_a(resource):
            logging.warning("in a")

        @pytest.mark.isolated
        def test_b(resource):
            assert 0

        @pytest.mark.isolated
        def test_c(resource):
            pass
        """
    )
    result = run("-x", "-p", "no:randomly", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*_ test_b _*", "*Captured stdout teardown*", "module fixture torn down"])
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
