"""Collect every isolated test's usage from its reports: the JSON file and the terminal summary.

Usage travels in ``report.user_properties`` (``isolate.*``), so the process that logs reports —
pytest, or the xdist controller — sees every test's figures without anything else crossing over.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import pytest

from ..engine.accounting import human_bytes

PREFIX = "isolate."


def usage_of(report: pytest.TestReport) -> dict[str, Any]:
    return {name[len(PREFIX):]: value for name, value in report.user_properties if str(name).startswith(PREFIX)}


class Recorder:
    """One record per isolated test: its outcome and its usage, in the order tests finished."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def add(self, report: pytest.TestReport) -> None:
        usage = usage_of(report)
        if not usage and report.nodeid not in self.records:
            return
        record = self.records.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "usage": {}})
        record["usage"].update(usage)
        if report.failed:
            record["outcome"] = "failed" if report.when == "call" else "error"
        elif report.skipped and record["outcome"] == "passed":
            record["outcome"] = "skipped"

    def write_json(self, path: str, header: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"header": header, "tests": list(self.records.values())}, f, indent=2)
            f.write("\n")

    def top(self, keys: tuple[str, ...], count: int) -> list[dict[str, Any]]:
        """The records with the largest sum of ``keys`` (e.g. user + system CPU), largest first."""
        ranked = [r for r in self.records.values() if any(r["usage"].get(k) is not None for k in keys)]
        ranked.sort(key=lambda r: -sum(float(r["usage"].get(k) or 0) for k in keys))
        return ranked if count == 0 else ranked[:count]


def _line(record: dict[str, Any]) -> str:
    u = record["usage"]
    cpu = (u.get("cpu_user_s") or 0) + (u.get("cpu_system_s") or 0)
    estimate = " (estimate)" if "estimate" in str(u.get("sources", "")) else ""
    return (f"{human_bytes(u.get('memory_peak_bytes')):>10}  cpu {cpu:6.2f}s  wall {u.get('wall_s', 0):6.2f}s  "
            f"{record['nodeid']}{estimate}")


def terminal_summary(terminal: Any, recorder: Recorder, count: Optional[int]) -> None:
    """Like ``--durations``: the tests that used the most, and how to see the rest."""
    if count is None or not recorder.records:
        return
    for keys, title in ((("memory_peak_bytes",), "peak memory"), (("cpu_user_s", "cpu_system_s"), "CPU time")):
        rows = recorder.top(keys, count)
        terminal.write_sep("=", f"isolate: {'all' if count == 0 else f'top {len(rows)}'} by {title}")
        for record in rows:
            terminal.write_line(_line(record))
        hidden = len(recorder.records) - len(rows)
        if hidden > 0:
            terminal.write_line(f"({hidden} more isolated tests; use --isolate-top=0 to show all)")
