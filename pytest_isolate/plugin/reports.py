"""Reports crossing the sandbox boundary, and the reports we make when a sandbox dies.

Reports travel only as JSON made by pytest's own ``pytest_report_to_serializable`` /
``pytest_report_from_serializable`` hooks (as pytest-xdist does); nothing is pickled.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional, Sequence

import pytest

from ..engine.channel import Channel
from ..engine.accounting import human_bytes
from ..engine.errors import signal_name


# what a report's fields hold: pytest asks os.PathLike about each when it serializes one
_FIELD_TYPES = (str, int, float, bool, type(None), list, tuple, dict)


def learn_field_types() -> None:
    """Have os.PathLike know the types of a report's fields before a test process is forked.

    pytest serializes a report with ``isinstance(value, os.PathLike)`` for each field. An ABC
    answers that by running Python code the first time per type, and caches the answer; in a forked
    test process the cache dies with the process, so each one paid again in its first report.
    Asked here, in the pytest process, the answers are inherited. Cheap once cached (any
    ``register`` on an ABC clears such caches, so this is asked before each test, not once)."""
    for kind in _FIELD_TYPES:
        issubclass(kind, os.PathLike)


def send_report(chan: Channel, config: pytest.Config, report: pytest.TestReport) -> None:
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    chan.send("report", data=data)
    if report.failed:
        chan.failed = True


def load_report(config: pytest.Config, data: dict[str, Any]) -> pytest.TestReport:
    if isinstance(data.get("longrepr"), list):  # a skip's (path, lineno, reason): JSON has no tuples
        data["longrepr"] = tuple(data["longrepr"])
    report = config.hook.pytest_report_from_serializable(config=config, data=data)
    assert isinstance(report, pytest.TestReport)
    return report


def describe_status(status: Optional[int]) -> str:
    """"crashed with SIGSEGV (signal 11)" / "exited with status 3" for a wait status."""
    if status is None:
        return "died without reporting its exit status"
    if os.WIFSIGNALED(status):
        num = os.WTERMSIG(status)
        return f"crashed with {signal_name(num)} (signal {num})"
    return f"exited with status {os.WEXITSTATUS(status)}"


def describe_end(status: Optional[int], timed_out: bool, wall: float, oom_kills: Optional[float], memory_peak: Optional[float],
                 memory: Optional[int], timeout: Optional[float]) -> str:
    """Why a sandbox's test process ended early, in the terms of its limits."""
    import sys

    if timed_out:
        return (f"Timeout: the isolated test ran for {wall:.2f} s, over its limit of timeout={timeout:g} s; "
                "the whole sandbox (every process in it) was killed")
    killed = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if oom_kills and killed:
        name = os.path.basename(sys.executable)
        return (f"OOM-killed: memory limit {human_bytes(memory)} reached (peak {human_bytes(memory_peak)}); "
                f"killed pid 2 ({name}), the test process")
    return f"the isolated test process {describe_status(status)}"


def make_report(
    item: pytest.Item,
    when: str,
    outcome: str,
    longrepr: Optional[str],
    sections: Sequence[tuple[str, str]] = (),
    duration: float = 0.0,
) -> pytest.TestReport:
    """A report the test itself could not send (it crashed, or its sandbox could not be built)."""
    return pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords={k: 1 for k in item.keywords},
        outcome=outcome,  # type: ignore[arg-type]
        longrepr=longrepr,
        when=when,  # type: ignore[arg-type]
        sections=list(sections),
        duration=duration,
        user_properties=list(item.user_properties),
    )
