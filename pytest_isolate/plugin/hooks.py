"""pytest hooks of pytest-isolate: options, the ``isolated`` marker, the runtest protocol, reports."""

from __future__ import annotations

import errno
import os
import platform
import warnings
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, NoReturn, Optional

import pytest

from .. import __version__
from ..engine.channel import Channel
from ..engine.explain import explain
from ..engine import errors
from ..engine.host import current_host, disk_upper_dirs
from ..engine.factory import Factory
from ..engine.launch import Launcher, Outcome, Plan, Running
from ..engine.spec import SandboxSpec, SpecError
from ..linux.cgroups import Driver, NoneDriver, detect
from ..linux.probe import Capabilities, Started, probe, start as start_probe
from . import protocol
from .marker import MARKER_HELP, item_spec
from .options import Settings, add_options, read_settings
from ..engine.accounting import human_bytes
from .reports import make_report
from .summary import Recorder, terminal_summary

if TYPE_CHECKING:
    from ..engine.sandbox import Sandbox

SPEC_KEY = pytest.StashKey[Optional[SandboxSpec]]()
PLAN_KEY = pytest.StashKey[Plan]()
WARNING_MARKS_KEY = pytest.StashKey[list[tuple[Any, ...]]]()
ISOLATE_HELP = "isolate every test of the run as if it were marked @pytest.mark.isolated"
EOVERFLOW_HINT = (
    "pytest-isolate: this file or directory is owned by a user that is not mapped in the rootless sandbox "
    "(e.g. root), so overlayfs cannot copy it up for writing. Rootless, a test can write where its user "
    "could write outside (tmp_path, /tmp, $HOME, ...). Fix: write under tmp_path, pass the directory in "
    "@pytest.mark.isolated(writable=[...]) to write to the real one, or run pytest as root."
)


class IsolationDegradedWarning(pytest.PytestWarning, errors.IsolationDegradedWarning):
    """An isolated test ran with less isolation than it asked for (--isolate-unavailable=degrade)."""


class Early:
    """What is started before pytest loads conftest files (pytest_load_initial_conftests), to be
    ready when the session needs it: the probe's child and, with --isolate, the factory, whose
    interpreter takes tens of milliseconds to start (and the cgroup driver detected to decide
    that, which State reuses). Handed to State; closed in pytest_unconfigure."""

    def __init__(self) -> None:
        self.probing: Optional[Started] = None
        self.factory: Optional[Factory] = None
        self.driver: Optional[Driver] = None

    def close(self) -> None:
        if self.probing is not None:
            self.probing.close()
            self.probing = None
        if self.factory is not None:
            self.factory.close()
            self.factory = None


EARLY_KEY = pytest.StashKey[Early]()


class State:
    """Everything pytest-isolate holds for one pytest process; released in pytest_unconfigure."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.early = config.stash.get(EARLY_KEY, None) or Early()
        self.recorder = Recorder()
        self._launcher: Optional[Launcher] = None
        self._caps: Optional[Capabilities] = None
        self._driver: Optional[Driver] = None
        self.plans: dict[tuple[SandboxSpec, str, str], Plan] = {}
        self.ahead: Optional[tuple[pytest.Item, Running]] = None  # the next item's payload, started early
        self._overlap: Optional[bool] = None

    @property
    def caps(self) -> Capabilities:
        if self._caps is None:
            self._caps = probe(cgroups=self.driver, started=self.early.probing)
        return self._caps

    @property
    def driver(self) -> Driver:
        if self._driver is None:
            self._driver = (self.early.driver or detect()) if self.settings.cgroups == "auto" else NoneDriver(
                "cgroups are turned off (--isolate-cgroups=off). Fix: use --isolate-cgroups=auto")
        return self._driver

    @property
    def launcher(self) -> Launcher:
        if self._launcher is None:
            factory, self.early.factory = self.early.factory, None
            self._launcher = Launcher(self.driver, factory)
        return self._launcher

    @property
    def overlap(self) -> bool:
        """Whether tests may overlap in this session (see _overlap): asked for, and nothing in the
        pytest process that a test process forked early could miss."""
        if self._overlap is None:
            self._overlap = self.settings.overlap and _overlap_safe(self.config)
        return self._overlap

    def take_ahead(self, item: pytest.Item) -> Optional[Running]:
        """The payload started early for ``item``, if any; one started for another item is cancelled."""
        if self.ahead is not None and self.ahead[0] is item:
            run, self.ahead = self.ahead[1], None
            return run
        self.cancel_ahead()
        return None

    def cancel_ahead(self) -> None:
        """Kill the payload started early, if any: its test is not to run (now)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            self.launcher.cancel(ahead[1])

    def close(self) -> None:
        self.cancel_ahead()
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        # upper layer bases on disk: the factory removes each once its last build is gone; here
        # those of a plan it never built for
        for plan in self.plans.values():
            for base in plan.root.upper_bases:
                try:
                    os.rmdir(base)
                except OSError:
                    pass

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Registered as a plugin: sees every logged report (under xdist, on the controller)."""
        self.recorder.add(report)


STATE_KEY = pytest.StashKey[State]()


def _state(config: pytest.Config) -> State:
    return config.stash[STATE_KEY]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate", "process isolation (pytest-isolate)")
    group.addoption("--isolate", action="store_true", default=False, help=ISOLATE_HELP)
    add_options(parser)


def _isolates_here_early(ns: Any) -> bool:
    """--isolate, and this process will run the tests, as far as the options tell before conftest
    files load (a pytest-xdist worker is told later: its factory starts at pytest_sessionstart)."""
    return (bool(getattr(ns, "isolate", False)) and not getattr(ns, "collectonly", False)
            and getattr(ns, "dist", "no") == "no" and not getattr(ns, "numprocesses", None)
            and not getattr(ns, "tx", None))


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Start the probe's child (unless pytest only prints its help or version) and, see
    _isolates_here_early, the factory now, so that both work while pytest loads conftest files
    and collects, instead of while the session waits. Not the factory where the cgroup driver may
    move this process (cgroup v2): it would stay behind, in a cgroup its sandboxes' processes
    cannot leave rootless; there it starts at pytest_sessionstart, after the move."""
    ns = early_config.known_args_namespace
    if getattr(ns, "help", False) or getattr(ns, "version", False):
        return
    early = Early()
    early_config.stash[EARLY_KEY] = early
    try:
        early.probing = start_probe()
        if _isolates_here_early(ns):
            early.driver = detect()
            if not early.driver.moves_self:
                early.factory = Factory()
    except OSError:  # no fork, no processes left: the session tries again where the error reaches a test
        pass


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        settings = read_settings(config)
    except SpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    state = State(config, settings)
    config.stash[STATE_KEY] = state
    config.pluginmanager.register(state, "isolate-state")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is not None:
        state.close()
        config.pluginmanager.unregister(state)
    early = config.stash.get(EARLY_KEY, None)
    if early is not None:  # after State's launcher: what it did not take (also if there is no State)
        early.close()


def header_line(caps: Capabilities, driver: Driver) -> str:
    """One line: what isolation is in effect for this run."""
    who = "root" if caps.root else "rootless"
    names = [f.name.split()[0].lower() for f in caps.features if f.name.endswith("namespace") and f.ok]
    if caps.root:
        names = [n for n in names if n != "user"]  # root needs no user namespace unless a marker asks
    upper = "tmpfs" if caps.get("tmpfs upper layer").ok else "disk"
    if not caps.full:
        missing = ", ".join(f.name for f in caps.missing)
        return f"isolate: {who}; NOT available here (missing: {missing}); see `python -m pytest_isolate doctor`"
    ok, why = driver.available()
    limits = f"limits and accounting: cgroup {driver.name}" if ok else f"limits: unavailable ({why.split('. Fix')[0]})"
    return f"isolate: {who}; namespaces {'+'.join(names)}; overlay root (upper layers on {upper}); {limits}"


def _runs_tests_here(config: pytest.Config) -> bool:
    """Whether this process runs the session's tests: not under --collect-only, and not the
    controller of pytest-xdist, whose workers run them (each with its own factory)."""
    if config.option.collectonly:
        return False
    return hasattr(config, "workerinput") or getattr(config.option, "dist", "no") == "no"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """With --isolate every test needs the factory: start its process now if it was not started
    early (a pytest-xdist worker; cgroup v2, see pytest_load_initial_conftests), so that its interpreter starts
    while pytest collects rather than while the first test waits for its sandbox."""
    config = session.config
    state = _state(config)
    if state.early.factory is not None:
        return
    if config.getoption("isolate") and _runs_tests_here(config) and state.caps.full:
        try:
            state.launcher.start()
        except Exception:  # noqa: BLE001 - started again on first use, where the error reaches a test
            pass


def pytest_report_header(config: pytest.Config) -> str:
    state = _state(config)
    return header_line(state.caps, state.driver)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    isolate_all = bool(config.getoption("isolate"))
    defaults = _state(config).settings.defaults
    for item in items:
        try:
            item.stash[SPEC_KEY] = item_spec(item, isolate_all, defaults)
        except SpecError as exc:
            raise pytest.UsageError(str(exc)) from None


def _plan(item: pytest.Item, spec: SandboxSpec) -> Plan:
    """The item's plan, made once: the next item's is made early, to build its sandbox ahead.

    Items with equal specs share one plan (and so one blueprint, serialized once); where upper
    layers go to disk, its bases too (each build makes its directories in them: factory.py)."""
    if PLAN_KEY not in item.stash:
        host = current_host()
        basetemp = str(item.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
        cwd = os.getcwd()
        plans = _state(item.config).plans
        key = (spec, cwd, basetemp)
        if key not in plans:
            bases = disk_upper_dirs() if host.needs_disk_upper(spec) else ()
            plans[key] = host.plan(spec, cwd=cwd, writable=(basetemp,), upper_bases=bases)
        item.stash[PLAN_KEY] = plans[key]
    return item.stash[PLAN_KEY]


def _pytest_timeout(item: pytest.Item) -> Optional[float]:
    """pytest-timeout's timeout for the item (marker, else its option or ini key), if it is installed."""
    config = item.config
    if not config.pluginmanager.hasplugin("timeout"):
        return None
    mark = item.get_closest_marker("timeout")
    value: Any = None
    if mark is not None:
        value = mark.args[0] if mark.args else mark.kwargs.get("timeout")
    else:
        value = config.getoption("timeout", None) or config.getini("timeout")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def _effective_timeout(item: pytest.Item, spec: SandboxSpec) -> Optional[float]:
    """The sooner of the spec's timeout and pytest-timeout's, both enforced by our supervisor."""
    found = [t for t in (spec.timeout, _pytest_timeout(item)) if t is not None]
    return min(found) if found else None


def _limits(spec: SandboxSpec) -> str:
    asked = [f"{name}={getattr(spec, name)!r}" for name in ("memory", "cpus", "pids") if getattr(spec, name) is not None]
    return ", ".join(asked)


def _starter(item: pytest.Item, nextitem: Optional[pytest.Item], spec: SandboxSpec, limited: bool,
             ahead: Optional[Running] = None) -> protocol.Starter:
    """How run_item starts the item's payload: launched now, or, if it was started early
    (``ahead``), waited for."""
    launcher = _state(item.config).launcher
    plan = _plan(item, spec)
    upcoming = nextitem.stash.get(SPEC_KEY, None) if nextitem is not None else None

    def order_next() -> None:
        if nextitem is not None and upcoming is not None:
            launcher.prepare(_plan(nextitem, upcoming))

    timeout = _effective_timeout(item, spec)

    def start(target: Callable[[Channel], int], on_done: Optional[Callable[[bool], None]]) -> Outcome:
        if ahead is not None:
            order_next()  # the sandbox ordered when it started was for a guess (see _overlap)
            return launcher.finish(ahead, on_done)
        return launcher.launch(plan, target, after_start=order_next, limited=limited, timeout=timeout, on_done=on_done)

    return start


OVERLAP_SAFE_WRAPPERS = ("_pytest.", "pytest_timeout")  # see _overlap_safe


def _overlap_safe(config: pytest.Config) -> bool:
    """Whether a test process forked before the test's turn would see what it would see on its turn,
    and the test would be run by us.

    Not if a plugin or conftest wraps each test's protocol (a ``pytest_runtest_protocol`` wrapper)
    other than pytest's own (their per-item context depends only on the item's path and
    ``filterwarnings`` marks, which _overlap compares) and pytest-timeout's (it sets no timer for
    isolated tests, see pytest_timeout_set_timer); nor if a protocol hook called before ours could
    take a test over (pytest-forked's does, with ``--forked``; _overlap checks its mark); nor if the
    test's output or a debugger reaches the terminal (``-s``, ``--pdb``, ``--trace``, live logging,
    ``--setup-show``), where it would interleave with the previous test's report."""
    impls = config.pluginmanager.hook.pytest_runtest_protocol.get_hookimpls()
    wrappers = [impl for impl in impls if impl.hookwrapper or getattr(impl, "wrapper", False)]
    plain = [impl for impl in impls if impl not in wrappers]
    ours = [k for k, impl in enumerate(plain) if impl.function is pytest_runtest_protocol]
    if not ours:
        return False
    for impl in wrappers:
        if not str(getattr(impl.function, "__module__", "")).startswith(OVERLAP_SAFE_WRAPPERS):
            return False
    for impl in plain[ours[0] + 1:]:  # called before ours (pluggy calls the list from its end)
        if str(getattr(impl.function, "__module__", "")) != "pytest_forked" or config.getvalue("forked"):
            return False
    option = config.option
    if getattr(option, "capture", "fd") == "no" or getattr(option, "usepdb", False) or getattr(option, "trace", False):
        return False
    if any(getattr(option, name, False) for name in ("setupshow", "setuponly", "setupplan")):
        return False
    return not (getattr(option, "log_cli_level", None) is not None or config.getini("log_cli"))


def _warning_marks(item: pytest.Item) -> list[tuple[Any, ...]]:
    """The item's ``filterwarnings`` marks, gathered once (each item is asked as the next item and
    again as the item)."""
    marks = item.stash.get(WARNING_MARKS_KEY, None)
    if marks is None:
        marks = [(mark.args, sorted(mark.kwargs.items())) for mark in item.iter_markers(name="filterwarnings")]
        item.stash[WARNING_MARKS_KEY] = marks
    return marks


def _overlap(item: pytest.Item, nextitem: Optional[pytest.Item], state: State) -> Optional[Callable[[], None]]:
    """How to start ``nextitem``'s payload before ``item``'s reports are read and logged (None: it
    can't be).

    Reading and logging a test's reports takes the pytest process about 1.5 ms, in which the next
    test's sandbox is ready and a core is free: its test process is forked as soon as ``item``'s
    says it is done (run_item), and the next call of our protocol hook only waits for it. The test
    process is a copy of the pytest process as of that moment, which differs from the one at the
    test's turn only in what reporting hooks (``pytest_runtest_logreport``, ``logfinish``,
    ``logstart``) do with the reports of the test before. The test's own hooks and fixtures run in
    its process as always. Overlap needs: the session's consent (State.overlap), the next item
    isolated and isolable here, in the same module (or class) with nothing to set up for it in the
    pytest process, and the same ``filterwarnings`` marks (the warning filters in effect at the fork
    are the item's). run_item adds that the item's process sent no failed report.
    """
    if nextitem is None or not state.overlap:
        return None
    spec = nextitem.stash.get(SPEC_KEY, None)
    if spec is None or nextitem.get_closest_marker("forked") is not None or _warning_marks(item) != _warning_marks(nextitem):
        return None

    def start_next() -> None:
        assert nextitem is not None and spec is not None
        try:
            if _unavailable(nextitem, spec, state) is not None or protocol._outer_setup_needed(nextitem):
                return
            if hasattr(nextitem, "_request") and not nextitem._request:
                nextitem._initrequest()  # type: ignore[attr-defined]
            plan = _plan(nextitem, spec)
            launcher = state.launcher
            items = nextitem.session.items

            def order_guess() -> None:
                # the item after is most likely alike (its hook corrects that); after the last
                # one none follows, and a sandbox built for it would only be torn down at the end
                if not items or items[-1] is not nextitem:
                    launcher.prepare(plan)

            run = launcher.begin(plan, lambda chan: protocol._sandboxed_protocol(nextitem, chan),
                                 after_start=order_guess, timeout=_effective_timeout(nextitem, spec))
        except Exception:  # noqa: BLE001 - it starts on its turn instead, where the error reaches its report
            return
        state.ahead = (nextitem, run)

    return start_next


def _decorator(item: pytest.Item) -> Callable[[list[pytest.TestReport], Outcome], None]:
    def decorate(reports: list[pytest.TestReport], outcome: Outcome) -> None:
        if outcome.measurement is None:
            return
        props = outcome.measurement.properties()
        for report in reports:
            report.user_properties = [p for p in report.user_properties if not str(p[0]).startswith("isolate.")] + props
        m = outcome.measurement
        oom = m.oom_kills or 0
        spec = outcome.spec
        if oom and reports and reports[-1].when != "teardown" and spec is not None:
            reports[-1].sections.append(("isolate", f"{int(oom)} process(es) in the sandbox were OOM-killed: memory limit "
                                         f"{human_bytes(spec.memory)} (peak {human_bytes(m.memory_peak)})"))

    return decorate


def _unavailable(item: pytest.Item, spec: SandboxSpec, state: State) -> Optional[str]:
    """Why the isolation or limits ``spec`` asks for cannot be had here (None: they can)."""
    caps = state.caps
    if not caps.full:
        missing = ", ".join(f.name for f in caps.missing)
        return f"isolation is not available on this host (missing: {missing}); see `python -m pytest_isolate doctor`"
    asked = _limits(spec)
    if asked:
        session, problem = state.launcher.cgroups()
        if session is None:
            return f"the limits {asked} cannot be enforced: {problem}"
    return None


def _refuse(item: pytest.Item, reason: str, policy: str) -> None:
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    if policy == "skip":
        report = make_report(item, "setup", "skipped", None)
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: pytest-isolate: {reason}")
    else:
        report = make_report(item, "setup", "failed", f"pytest-isolate: {reason}\n(--isolate-unavailable=skip or =degrade "
                                                          "changes what happens when isolation cannot be had)")
    ihook.pytest_runtest_logreport(report=report)
    ihook.pytest_runtest_logreport(report=make_report(item, "teardown", "passed", None))
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Optional[bool]:
    spec = item.stash.get(SPEC_KEY, None)
    if protocol.IN_SANDBOX:
        return None
    state = _state(item.config)
    ahead = state.take_ahead(item)
    if spec is None:
        return None
    reason = _unavailable(item, spec, state)
    if ahead is not None and (reason is not None or protocol._outer_setup_needed(item)):
        state.launcher.cancel(ahead)  # something changed since it started: start it afresh, or not
        ahead = None
    limited = True
    if reason is not None:
        policy = state.settings.policy
        if policy != "degrade":
            _refuse(item, reason, policy)
            return True
        try:
            warnings.warn(IsolationDegradedWarning(f"{item.nodeid}: {reason}; running with less isolation"))
        except Warning as error:  # -W error: the degraded run becomes this test's failure, not an INTERNALERROR
            _refuse(item, f"{type(error).__name__}: {error}", "fail")
            return True
        if not state.caps.full:
            return None  # run it as a plain test: nothing to sandbox with
        limited = False
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    protocol.run_item(item, nextitem, _starter(item, nextitem, spec, limited, ahead), explain, _decorator(item),
                      _overlap(item, nextitem, state) if limited else None)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    if item.session.shouldfail or item.session.shouldstop:
        state.cancel_ahead()  # the session ends here: the next test must not run
    return True


def _header(state: State) -> dict[str, Any]:
    caps, driver = state.caps, state.driver
    ok, why = driver.available()
    return {
        "plugin": f"pytest-isolate-ns {__version__}",
        "kernel": platform.release(),
        "root": caps.root,
        "namespaces": [f.name for f in caps.features if f.name.endswith("namespace") and f.ok],
        "isolation_available": caps.full,
        "cgroup": {"driver": driver.name, "limits_available": ok, "reason": why},
        "defaults": {name: getattr(state.settings.defaults, name) for name in ("memory", "cpus", "pids", "timeout")},
        "unavailable_policy": state.settings.policy,
    }


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    path = config.getoption("isolate_json")
    if path and not hasattr(config, "workerinput"):
        state = _state(config)
        state.recorder.write_json(path, _header(state))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    terminal_summary(terminalreporter, _state(config).recorder, config.getoption("isolate_top"))


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Optional[bool]:
    """pytest-timeout's own hook: an isolated test's timeout is enforced by our supervisor, which
    kills the whole sandbox, never by a signal in the pytest process."""
    return True if item.stash.get(SPEC_KEY, None) is not None else None


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> Optional[bool]:
    return True if item.stash.get(SPEC_KEY, None) is not None else None


def _explain_errors(exc: Optional[BaseException], spec: Optional[SandboxSpec]) -> None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.EOVERFLOW and EOVERFLOW_HINT not in str(exc.strerror):
            exc.strerror = f"{exc.strerror}\n{EOVERFLOW_HINT}"
        if isinstance(exc, OSError) and exc.errno == errno.EAGAIN and spec is not None and spec.pids is not None:
            hint = f"pytest-isolate: the sandbox's process limit pids={spec.pids} is reached"
            if hint not in str(exc.strerror):
                exc.strerror = f"{exc.strerror}\n{hint}"
        exc = exc.__cause__ or exc.__context__


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    if protocol.IN_SANDBOX and call.excinfo is not None:
        plan = item.stash.get(PLAN_KEY, None)
        _explain_errors(call.excinfo.value, plan.spec if plan is not None else None)
    yield


class Isolation:
    """What the ``isolation`` fixture gives an isolated test: its limits and its live usage."""

    def __init__(self, spec: SandboxSpec, launcher: Launcher) -> None:
        self.limits = spec
        self._launcher = launcher

    def usage(self) -> Any:
        """Usage so far (cgroup counters, or estimates from rusage without a cgroup)."""
        return self._launcher.live_usage()


@pytest.fixture
def isolation(request: pytest.FixtureRequest) -> Isolation:
    """The limits in effect and live usage of this isolated test (``isolation.usage().memory_peak``)."""
    plan = request.node.stash.get(PLAN_KEY, None)
    if not protocol.IN_SANDBOX or plan is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: the isolation fixture exists only in isolated tests; "
            "mark the test with @pytest.mark.isolated (or run with --isolate)"
        )
    return Isolation(plan.spec, _state(request.config).launcher)


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator["Sandbox"]:
    """A ``pytest_isolate.Sandbox`` for this test: ``sandbox.run([...])``, ``popen``, ``call``, ``network()``.

    What cannot be isolated on this host follows ``--isolate-unavailable`` (fail, skip, degrade).
    At teardown — also after a failure — every program still running is killed, and its sandbox,
    cgroup and networks are removed.
    """
    from ..engine.sandbox import Sandbox

    box = Sandbox(unavailable=_state(request.config).settings.policy, skip=_skip)
    try:
        yield box
    finally:
        box.close()


def _skip(reason: str) -> NoReturn:
    pytest.skip(reason)
