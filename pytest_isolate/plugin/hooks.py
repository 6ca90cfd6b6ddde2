"""pytest hooks of pytest-isolate: options, the ``isolated`` marker, and the runtest protocol."""

from __future__ import annotations

import errno
import os
from typing import Any, Callable, Generator, Optional

import pytest

from ..engine.channel import Channel
from ..engine.explain import explain
from ..engine.host import current_host, disk_upper_dirs
from ..engine.launch import Launcher, Outcome, Plan
from ..engine.spec import SandboxSpec, SpecError
from ..linux.probe import Capabilities, probe
from . import protocol
from .marker import MARKER_HELP, item_spec

SPEC_KEY = pytest.StashKey[Optional[SandboxSpec]]()
MUST_WORK_ENV = "PYTEST_ISOLATE_MUST_WORK"
ISOLATE_HELP = "isolate every test of the run as if it were marked @pytest.mark.isolated"
EOVERFLOW_HINT = (
    "pytest-isolate: this file or directory is owned by a user that is not mapped in the rootless sandbox "
    "(e.g. root), so overlayfs cannot copy it up for writing. Rootless, a test can write where its user "
    "could write outside (tmp_path, /tmp, $HOME, ...). Fix: write under tmp_path, pass the directory in "
    "@pytest.mark.isolated(writable=[...]) to write to the real one, or run pytest as root."
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate", "process isolation (pytest-isolate)")
    group.addoption("--isolate", action="store_true", default=False, help=ISOLATE_HELP)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)


def header_line(caps: Capabilities) -> str:
    """One line: what isolation is in effect for this run."""
    who = "root" if caps.root else "rootless"
    names = [f.name.split()[0] for f in caps.features if f.name.endswith("namespace") and f.ok]
    if caps.root:
        names = [n for n in names if n != "user"]  # root needs no user namespace unless a marker asks
    upper = "tmpfs" if caps.get("tmpfs upper layer").ok else "disk"
    if not caps.full:
        missing = ", ".join(f.name for f in caps.missing)
        return f"isolate: {who}; NOT available here (missing: {missing}); see `python -m pytest_isolate doctor`"
    return f"isolate: {who}; namespaces {'+'.join(n.lower() for n in names)}; overlay root (upper layers on {upper}); limits: not enforced"


def pytest_report_header(config: pytest.Config) -> str:
    return header_line(probe())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    isolate_all = bool(config.getoption("isolate"))
    for item in items:
        try:
            item.stash[SPEC_KEY] = item_spec(item, isolate_all)
        except SpecError as exc:
            raise pytest.UsageError(str(exc)) from None


LAUNCHER_KEY = pytest.StashKey[Launcher]()
PLAN_KEY = pytest.StashKey[Plan]()


def _launcher(config: pytest.Config) -> Launcher:
    if LAUNCHER_KEY not in config.stash:
        config.stash[LAUNCHER_KEY] = Launcher()
    return config.stash[LAUNCHER_KEY]


def _plan(item: pytest.Item, spec: SandboxSpec) -> Plan:
    """The item's plan, made once: the next item's is made early, to build its sandbox ahead."""
    if PLAN_KEY not in item.stash:
        host = current_host()
        basetemp = str(item.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
        bases = disk_upper_dirs() if host.needs_disk_upper(spec) else ()
        item.stash[PLAN_KEY] = host.plan(spec, cwd=os.getcwd(), writable=(basetemp,), upper_bases=bases)
    return item.stash[PLAN_KEY]


def _starter(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Callable[[Callable[[Channel], int]], Outcome]:
    launcher = _launcher(item.config)
    plan = _plan(item, item.stash[SPEC_KEY])  # type: ignore[arg-type]
    upcoming = nextitem.stash.get(SPEC_KEY, None) if nextitem is not None else None

    def order_next() -> None:
        if nextitem is not None and upcoming is not None:
            launcher.prepare(_plan(nextitem, upcoming))

    def start(target: Callable[[Channel], int]) -> Outcome:
        return launcher.launch(plan, target, after_start=order_next)

    return start


def pytest_unconfigure(config: pytest.Config) -> None:
    launcher = config.stash.get(LAUNCHER_KEY, None)
    if launcher is not None:
        launcher.close()
        del config.stash[LAUNCHER_KEY]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Optional[bool]:
    spec = item.stash.get(SPEC_KEY, None)
    if spec is None or protocol.IN_SANDBOX:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    protocol.run_item(item, nextitem, _starter(item, nextitem), explain)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _explain_eoverflow(exc: Optional[BaseException]) -> None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.EOVERFLOW and EOVERFLOW_HINT not in str(exc.strerror):
            exc.strerror = f"{exc.strerror}\n{EOVERFLOW_HINT}"
        exc = exc.__cause__ or exc.__context__


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    if protocol.IN_SANDBOX and call.excinfo is not None:
        _explain_eoverflow(call.excinfo.value)
    yield
