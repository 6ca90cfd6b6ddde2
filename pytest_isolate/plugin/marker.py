"""Turn ``@pytest.mark.isolated(...)`` (function, class, module) and ``--isolate`` into a spec.

The closest marker wins per argument (function over class over module). Arguments are keyword-only
and validated at collection, so a typo stops the run with a message naming the test and the argument.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

from ..engine.spec import SandboxSpec, SpecError, build_spec

MARKER = "isolated"
MARKER_ARGS = ("net", "hostname", "writable", "user_namespace", "memory", "cpus", "pids", "timeout")
MARKER_HELP = (
    f"{MARKER}(net='none', hostname='isolated', writable=(), user_namespace=None, memory=None, cpus=None, "
    "pids=None, timeout=None): run the test, its function-scoped fixtures and their teardown in fresh "
    "namespaces over a copy-on-write root, with cgroup limits."
)


def marker_values(item: pytest.Item) -> Optional[dict[str, Any]]:
    """Merged keyword arguments of every ``isolated`` marker on the item, or None if unmarked."""
    marks = list(item.iter_markers(MARKER))
    if not marks:
        return None
    values: dict[str, Any] = {}
    for mark in reversed(marks):  # farthest first, so closer markers override
        if mark.args:
            raise SpecError(
                f"positional argument{'s' if len(mark.args) > 1 else ''} {', '.join(map(repr, mark.args))} "
                f"from marker on {item.nodeid}: @pytest.mark.{MARKER} takes keyword arguments only, "
                f"e.g. @pytest.mark.{MARKER}(net='host')"
            )
        values.update(mark.kwargs)
    return values


def item_spec(item: pytest.Item, isolate_all: bool, defaults: Optional[SandboxSpec] = None) -> Optional[SandboxSpec]:
    """The item's sandbox spec, or None when the item is not isolated."""
    values = marker_values(item)
    if values is None:
        if not isolate_all:
            return None
        values = {}
    return build_spec(values, f"from marker on {item.nodeid}", base=str(item.config.rootpath), allowed=MARKER_ARGS,
                      defaults=defaults)
