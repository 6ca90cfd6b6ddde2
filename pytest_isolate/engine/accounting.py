"""What one sandbox used, from its cgroup when there is one, else estimated from rusage.

Every figure carries where it came from, so a report never passes an estimate off as a kernel
counter.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Optional, Union

from ..linux.cgroups import Usage

Number = Union[int, float]
FIELDS = ("memory_peak", "cpu_user", "cpu_system", "wall", "pids_peak", "io_read_bytes", "io_write_bytes",
          "oom_kills", "cpu_throttled")
# The property name of each figure says its unit.
PROPERTY = {"memory_peak": "memory_peak_bytes", "cpu_user": "cpu_user_s", "cpu_system": "cpu_system_s", "wall": "wall_s",
            "pids_peak": "pids_peak", "io_read_bytes": "io_read_bytes", "io_write_bytes": "io_write_bytes",
            "oom_kills": "oom_kills", "cpu_throttled": "cpu_throttled_s"}


@dataclass(frozen=True)
class Measurement:
    """One sandbox's usage: each figure with its source ("cgroup", "estimate" or "wall clock")."""

    values: dict[str, Optional[Number]]
    sources: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Optional[Number]:
        if name in FIELDS:
            return self.values.get(name)
        raise AttributeError(name)

    def properties(self) -> list[tuple[str, object]]:
        """``(name, value)`` pairs for ``report.user_properties`` (JUnit ``<property>``)."""
        props: list[tuple[str, object]] = []
        for name in FIELDS:
            value = self.values.get(name)
            if value is not None:
                props.append((f"isolate.{PROPERTY[name]}", round(value, 6) if isinstance(value, float) else value))
        props.append(("isolate.sources", ",".join(f"{k}={v}" for k, v in sorted(self.sources.items()))))
        return props


def from_cgroup(usage: Usage, wall: float) -> Measurement:
    values: dict[str, Optional[Number]] = {name: getattr(usage, name) for name in FIELDS if name != "wall"}
    values["wall"] = wall
    sources = {name: ("estimate" if name in usage.estimated else "cgroup") for name, v in values.items() if v is not None}
    sources["wall"] = "wall clock"
    return Measurement(values, sources)


def from_rusage(rusage: Optional[resource.struct_rusage], wall: float) -> Measurement:
    """Without a cgroup: the waited-for processes' rusage (ru_maxrss is the largest one's peak)."""
    values: dict[str, Optional[Number]] = {"wall": wall}
    if rusage is not None:
        values.update(memory_peak=rusage.ru_maxrss * 1024, cpu_user=rusage.ru_utime, cpu_system=rusage.ru_stime,
                      io_read_bytes=rusage.ru_inblock * 512, io_write_bytes=rusage.ru_oublock * 512)
    sources = {name: "estimate" for name in values}
    sources["wall"] = "wall clock"
    return Measurement(values, sources)


def human_bytes(value: Optional[float]) -> str:
    """1536 -> '1.5 KiB': binary units, as the limits are written."""
    if value is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
