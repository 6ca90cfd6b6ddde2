"""Run one test item in a sandbox with pytest's own phases, split between two processes.

In the pytest process (before the fork): the setup phase with ``item.setup`` narrowed to the
higher-scoped fixtures, so class/module/package/session fixtures are created once, here, in pytest's
order, and inherited by the sandbox. In the sandbox: setup (function-scoped fixtures), call and
teardown of the item, as ``runtestprotocol`` does, each report sent back as JSON the moment it
exists. Back in the pytest process: the teardown phase again, which pops the item and tears down
whatever higher-scoped fixtures the next item does not need, once, here.

The pytest-process phases run only when they have work there (see ``_outer_setup_needed``): for
most items of a module nothing is left to set up or tear down outside, and the sandbox runs every
phase with all its hooks anyway.
"""

from __future__ import annotations

import faulthandler
import warnings
from typing import Any, Callable, Optional

import pytest
from _pytest.runner import call_and_report

from ..engine.channel import Channel
from ..engine.launch import Outcome
from .reports import describe_end, learn_field_types, load_report, make_report, send_report

# True in the sandbox's payload process (PID 2); hooks that only matter there check it.
IN_SANDBOX = False


EVALUATED_AT_SETUP = ("skip", "skipif", "xfail")  # marks pytest's setup phase acts on


def _scope_of(item: pytest.Item, name: str) -> str:
    defs = item._fixtureinfo.name2fixturedefs.get(name)  # type: ignore[attr-defined]
    return str(defs[-1].scope) if defs else "function"


def _outer_setup_needed(item: pytest.Item) -> bool:
    """Whether the setup phase has work in the pytest process: a node of the item's chain (module,
    class, ...) to set up, a higher-scoped fixture not yet made (or parametrized: its value may
    change from item to item), or a skip/xfail mark, evaluated here so that a skipped test builds no
    sandbox. Without any, pytest's setup would only push the item on its stack, and the sandbox does
    the whole setup phase (every hook) anyway: we save the hook calls."""
    if item.session.shouldfail or item.session.shouldstop:
        return True
    stack = item.session._setupstate.stack  # type: ignore[attr-defined,unused-ignore]
    if list(stack) != item.listchain()[:-1] or any(exc is not None for _, exc in stack.values()):
        return True  # a node to set up, or one whose setup failed (pytest raises that again here)
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return True
    for name in info.names_closure:
        if _scope_of(item, name) != "function":
            fixturedef = info.name2fixturedefs[name][-1]
            if fixturedef.cached_result is None or fixturedef.params is not None:
                return True
    return any(item.get_closest_marker(name) is not None for name in EVALUATED_AT_SETUP)


def _outer_teardown_needed(item: pytest.Item, nextitem: Optional[pytest.Item]) -> bool:
    """Whether the teardown phase has work in the pytest process: a node on the stack (the item
    itself, if its setup ran here) that the next item does not need."""
    if nextitem is None or item.session.shouldfail or item.session.shouldstop:
        return True
    needed = set(nextitem.listchain())
    return any(node not in needed for node in item.session._setupstate.stack)  # type: ignore[attr-defined,unused-ignore]


def _setup_outer_scopes(item: pytest.Item) -> None:
    """The pytest-process half of ``Function.setup``: only fixtures broader than the function."""
    info = getattr(item, "_fixtureinfo", None)
    request = getattr(item, "_request", None)
    if info is None or not request:
        return
    for name in info.names_closure:
        if _scope_of(item, name) != "function":
            request.getfixturevalue(name)


def _outer_setup(item: pytest.Item, nothing: bool = False) -> pytest.TestReport:
    """The setup phase in the pytest process: fixtures broader than the function, or, with
    ``nothing``, only the phase's hooks (see _outer_teardown)."""
    setup = (lambda: None) if nothing else (lambda: _setup_outer_scopes(item))
    item.setup = setup  # type: ignore[method-assign,unused-ignore]
    try:
        return call_and_report(item, "setup", log=False)
    finally:
        del item.setup


def _outer_teardown(item: pytest.Item, nextitem: Optional[pytest.Item], paired: bool) -> Optional[pytest.TestReport]:
    """The teardown phase in the pytest process, if it has work (else None). Its hooks run only
    after the setup phase's (``paired``): plugins keep per-item state from one to the other (the
    logging plugin's records), so a teardown that became necessary meanwhile (``-x`` after this
    item failed) first gets a setup phase with nothing to set up."""
    report = None
    if _outer_teardown_needed(item, nextitem):
        if not paired:
            _outer_setup(item, nothing=True)
        if item.session.shouldfail or item.session.shouldstop:
            nextitem = None
        report = call_and_report(item, "teardown", log=False, nextitem=nextitem)
    if hasattr(item, "_request"):  # release fixture values, as runtestprotocol does
        setattr(item, "_request", False)
        setattr(item, "funcargs", None)
    return report


def _forget_outer_state(item: pytest.Item) -> None:
    """In the sandbox: the stack's finalizers belong to the pytest process; drop our copies.

    Finalizers registered from now on (a higher-scoped fixture first requested inside the sandbox)
    run at this sandbox's teardown, as the sandbox tears down the whole stack.
    """
    stack = item.session._setupstate.stack  # type: ignore[attr-defined,unused-ignore]
    for node, (_, exc) in list(stack.items()):
        stack[node] = ([], exc)
    stack.pop(item, None)


def _sandboxed_protocol(item: pytest.Item, chan: Channel) -> int:
    global IN_SANDBOX
    IN_SANDBOX = True
    if faulthandler.is_enabled():
        faulthandler.enable(file=2)  # fd 2: captured, so a crash dump reaches the report
    _forget_outer_state(item)
    config = item.config
    with warnings.catch_warnings(record=True) as caught:
        report = call_and_report(item, "setup", log=False)
        send_report(chan, config, report)
        if report.passed and not config.getoption("setuponly", False):
            send_report(chan, config, call_and_report(item, "call", log=False))
        send_report(chan, config, call_and_report(item, "teardown", log=False, nextitem=None))
    for w in caught:
        cat = w.category
        chan.send("warning", message=str(w.message), category=f"{cat.__module__}:{cat.__qualname__}",
                  filename=w.filename, lineno=w.lineno)
    return 0


def _replay_warning(record: dict[str, Any]) -> None:
    module, _, name = record["category"].partition(":")
    category: Any = UserWarning
    try:
        category = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        pass
    if not (isinstance(category, type) and issubclass(category, Warning)):
        category = UserWarning
    warnings.warn_explicit(record["message"], category, record["filename"], record["lineno"])


def _captured_since_crash(config: pytest.Config) -> list[tuple[str, str]]:
    capman = config.pluginmanager.getplugin("capturemanager")
    try:
        out, err = capman.read_global_capture()
    except Exception:
        return []
    return [(f"Captured {name} call", text) for name, text in (("stdout", out), ("stderr", err)) if text]


def _crash_report(item: pytest.Item, outcome: Outcome, when: str) -> pytest.TestReport:
    m = outcome.measurement
    spec = outcome.spec
    what = describe_end(outcome.status, outcome.timed_out, outcome.wall, m.oom_kills if m else None,
                        m.memory_peak if m else None, spec.memory if spec else None, spec.timeout if spec else None)
    text = f"{item.nodeid}: {what} (during {when}); the sandbox and every process in it are gone and the run continues."
    return make_report(item, when, "failed", text, _captured_since_crash(item.config), outcome.wall)


def _setup_error_report(item: pytest.Item, outcome: Outcome, hint: Callable[[Any], str]) -> pytest.TestReport:
    err = outcome.setup_error
    assert err is not None
    return make_report(item, "setup", "failed", hint(err), (), outcome.wall)


def child_reports(item: pytest.Item, outcome: Outcome, hint: Callable[[Any], str]) -> list[pytest.TestReport]:
    """The sandbox's reports, completed with failure reports for whatever it could not send."""
    reports = [load_report(item.config, r["data"]) for r in outcome.records if r["kind"] == "report"]
    if outcome.setup_error is not None and not reports:
        return [_setup_error_report(item, outcome, hint)]
    whens = [r.when for r in reports]
    if "setup" not in whens:
        return [_crash_report(item, outcome, "setup")]
    if "teardown" not in whens:
        if reports[0].passed and "call" not in whens:
            reports.append(_crash_report(item, outcome, "call"))
        elif "call" in whens:
            reports.append(_crash_report(item, outcome, "teardown"))
    return reports


def _merge_teardown(item: pytest.Item, sandbox: Optional[pytest.TestReport], outer: Optional[pytest.TestReport]) -> pytest.TestReport:
    if outer is None:
        return sandbox if sandbox is not None else make_report(item, "teardown", "passed", None)
    if sandbox is None:
        return outer
    sandbox.sections = list(sandbox.sections) + list(outer.sections)
    if outer.failed and not sandbox.failed:
        outer.sections = sandbox.sections
        return outer
    if outer.failed:
        sandbox.sections.append(("teardown in the pytest process", str(outer.longrepr)))
    return sandbox


Starter = Callable[[Callable[[Channel], int], Optional[Callable[[bool], None]]], Outcome]


def run_item(item: pytest.Item, nextitem: Optional[pytest.Item], start: Starter, hint: Callable[[Any], str],
             decorate: Callable[[list[pytest.TestReport], Outcome], None],
             start_next: Optional[Callable[[], None]] = None) -> None:
    """The whole protocol for one isolated item; logs its reports like ``runtestprotocol``.

    ``start(target, on_done)`` runs ``target`` in the item's sandbox and calls ``on_done(failed)``
    as soon as the sandbox says it is done. ``start_next`` starts the next item's test process (see
    hooks._overlap): called then, before this item's records are even read, if nothing is left to
    do in the pytest process between the two items (no setup or teardown here) and no report of
    this item failed (``-x`` may stop the session after it)."""
    ihook = item.ihook
    log = ihook.pytest_runtest_logreport
    if hasattr(item, "_request") and not item._request:
        item._initrequest()  # type: ignore[attr-defined]
    setup = None
    if _outer_setup_needed(item) or _outer_teardown_needed(item, nextitem):
        setup = _outer_setup(item)
        if not setup.passed:
            log(report=setup)
            log(report=_merge_teardown(item, None, _outer_teardown(item, nextitem, True)))
            return
    on_done = None
    if start_next is not None and setup is None and not _outer_teardown_needed(item, nextitem):
        def on_done(failed: bool) -> None:
            if not failed:
                start_next()

    learn_field_types()  # before this item's fork, and the next one's (start_next, from on_done)
    outcome = start(lambda chan: _sandboxed_protocol(item, chan), on_done)
    reports = child_reports(item, outcome, hint)
    if setup is not None:
        reports[0].sections = list(setup.sections) + list(reports[0].sections)
    sandbox_teardown = reports.pop() if reports[-1].when == "teardown" else None
    decorate(reports, outcome)
    for report in reports:
        log(report=report)
    for record in outcome.records:
        if record["kind"] == "warning":
            _replay_warning(record)
    teardown = _merge_teardown(item, sandbox_teardown, _outer_teardown(item, nextitem, setup is not None))
    decorate([teardown], outcome)
    log(report=teardown)
