"""When the factory's process starts: with --isolate before pytest loads conftest files (its
interpreter starts while pytest loads them and collects), otherwise on the first isolated test;
never for a run that isolates nothing. The probe's child is started as early and reaped."""

from __future__ import annotations

import pytest

from conftest import Runner

# Reports, at the end of collection and at each test's start, whether the pytest process has a
# factory child (the factory's command line names its module).
RECORD_FACTORY = """
import psutil

def _cmdline(process):
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # a test's process exited, not yet reaped
        return ""

def _factory_running():
    return any("pytest_isolate.engine.factory" in _cmdline(c) for c in psutil.Process().children())

AT_IMPORT = _factory_running()

def pytest_collection_finish(session):
    print(f"\\nFACTORY-AT-CONFTEST={AT_IMPORT} FACTORY-AT-COLLECTION={_factory_running()}")
"""


def _early() -> str:
    """Whether --isolate starts the factory before conftest files load here: not on cgroup v2,
    whose driver may move the pytest process first (it starts at pytest_sessionstart there)."""
    from pytest_isolate.linux.cgroups import detect

    return str(not detect().moves_self)


@pytest.mark.parametrize(("args", "started"), [
    (("--isolate",), "True"),
    (("--isolate", "--collect-only"), "False"),
    ((), "False"),  # markers only: started by the first isolated test, not before
])
def test_factory_starts_at_session_start_only_with_isolate(pytester: pytest.Pytester, run: Runner,
                                                            args: tuple[str, ...], started: str) -> None:
    pytester.makeconftest(RECORD_FACTORY)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.isolated
        def test_marked():
            pass

        def test_plain():
            pass
    """)
    result = run("-s", *args)
    at_conftest = _early() if started == "True" else "False"
    result.stdout.fnmatch_lines([f"FACTORY-AT-CONFTEST={at_conftest} FACTORY-AT-COLLECTION={started}"])
    assert result.ret == 0


def test_early_start_is_undone_when_configuration_fails(pytester: pytest.Pytester, run: Runner) -> None:
    """The factory and the probe's child, started before conftest files load, end with the run
    also when pytest_configure refuses the options: after the last unconfigure hook the pytest
    process has no child left (none killed by its death: closed and reaped)."""
    pytester.makeconftest(RECORD_FACTORY + """
import pytest

@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    left = [c.pid for c in psutil.Process().children()]
    with open("ends.txt", "w") as f:
        f.write(f"factory-at-import={AT_IMPORT} children-at-end={left}")
""")
    pytester.makepyfile("def test_one():\n    pass\n")
    result = run("--isolate", "--isolate-memory=lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*lots*"])
    assert (pytester.path / "ends.txt").read_text() == f"factory-at-import={_early()} children-at-end=[]"


def test_xdist_controller_starts_no_factory(pytester: pytest.Pytester, run: Runner) -> None:
    """Under pytest-xdist the workers run the tests, each with its factory; the controller none."""
    pytest.importorskip("xdist")
    pytester.makeconftest(RECORD_FACTORY + """
def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):
        print(f"\\nCONTROLLER-FACTORY={_factory_running()}")
""")
    pytester.makepyfile("""
        def test_one():
            pass

        def test_two():
            pass
    """)
    result = run("-s", "-n", "2", "--isolate")
    result.stdout.fnmatch_lines(["CONTROLLER-FACTORY=False"])
    assert result.ret == 0
