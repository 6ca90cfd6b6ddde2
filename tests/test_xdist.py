"""Under pytest-xdist every worker isolates its own tests."""

from __future__ import annotations

import pytest

from conftest import Runner


def test_xdist_workers_isolate(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        """
        import os, socket, pytest
        pytestmark = pytest.mark.isolated

        @pytest.mark.parametrize("n", range(8))
        def test_many(n):
            assert os.getpid() == 2
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
        """
    )
    result = run("-n", "2")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*2 workers*"])
