"""Marker arguments are keyword-only and validated at collection; errors name test and argument."""

from __future__ import annotations

import pytest

from conftest import Runner


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("isolated('none')", "*positional argument 'none' from marker on *::test_x*keyword arguments only*"),
        ("isolated(network='none')", "*unknown argument network from marker on *::test_x*known: net, hostname, writable, user_namespace, memory, cpus, pids, timeout*"),
        ("isolated(net='bridge')", "*net='bridge' from marker on *::test_x: expected one of 'none', 'host'*"),
        ("isolated(hostname='bad name!')", "*hostname='bad name!' from marker on *::test_x*"),
        ("isolated(writable=['/does/not/exist'])", "*writable=*from marker on *::test_x: /does/not/exist is not an existing directory*"),
        ("isolated(user_namespace='yes')", "*user_namespace='yes' from marker on *::test_x: expected True, False or None*"),
        ("isolated(memory='256Q')", "*memory='256Q' from marker on *::test_x: unknown unit Q*"),
        ("isolated(cpus=0)", "*cpus=0 from marker on *::test_x: expected a positive number*"),
        ("isolated(pids=1.5)", "*pids=1.5 from marker on *::test_x: expected a positive integer*"),
        ("isolated(timeout='soon')", "*timeout='soon' from marker on *::test_x: expected a positive number*"),
    ],
)
def test_invalid_marker_is_a_usage_error(pytester: pytest.Pytester, run: Runner, marker: str, message: str) -> None:
    pytester.makepyfile(f"import pytest\n@pytest.mark.{marker}\ndef test_x(): pass\n")
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_closest_marker_wins(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        """
        import socket, pytest
        pytestmark = pytest.mark.isolated(hostname="from-module")

        @pytest.mark.isolated(hostname="from-class")
        class TestC:
            @pytest.mark.isolated(hostname="from-function")
            def test_f(self):
                assert socket.gethostname() == "from-function"

            def test_c(self):
                assert socket.gethostname() == "from-class"

        def test_m():
            assert socket.gethostname() == "from-module"
        """
    )
    run().assert_outcomes(passed=3)
