"""What a sandbox should be: one frozen, validated value shared by the marker, options and the API.

Validation errors name where a value came from ("from marker on test_x") and what is wrong, so a
typo never becomes a silent default.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional

NETS = ("none", "host")
_UNITS = {"": 1, "B": 1, "K": 2**10, "KI": 2**10, "M": 2**20, "MI": 2**20, "G": 2**30, "GI": 2**30, "T": 2**40, "TI": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*?)[Bb]?\s*$")
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")


class SpecError(ValueError):
    """A sandbox argument with a wrong name or value."""


@dataclass(frozen=True)
class SandboxSpec:
    """Isolation and limits for one sandbox. ``None`` limits mean "no limit"."""

    net: str = "none"
    hostname: str = "isolated"
    writable: tuple[str, ...] = ()
    user_namespace: Optional[bool] = None
    memory: Optional[int] = None
    cpus: Optional[float] = None
    pids: Optional[int] = None
    timeout: Optional[float] = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def merged(self, **changes: Any) -> "SandboxSpec":
        return replace(self, **changes)


FIELD_NAMES = tuple(f.name for f in fields(SandboxSpec) if f.name != "extra")


def parse_size(value: object, name: str, where: str) -> int:
    """``"256M"``, ``"1.5G"``, ``"512Ki"`` or an int of bytes; binary units (K = 1024)."""
    if isinstance(value, bool):
        raise SpecError(f"{name}={value!r} {where}: expected bytes as int or a size like '256M'")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, str) and _SIZE.match(value):
        m = _SIZE.match(value)
        assert m is not None
        number, unit = float(m.group(1)), m.group(2).upper()
        if unit not in _UNITS:
            raise SpecError(f"{name}={value!r} {where}: unknown unit {m.group(2)} (use K, M, G or T; binary, 1K = 1024 bytes)")
    else:
        raise SpecError(f"{name}={value!r} {where}: expected bytes as int or a size like '256M'")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise SpecError(f"{name}={value!r} {where}: must be positive")
    return size


def _positive(value: object, name: str, where: str, kind: type) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()  # type: ignore[arg-type]
    if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type, operator]
        what = "a positive integer" if kind is int else "a positive number"
        raise SpecError(f"{name}={value!r} {where}: expected {what}")
    return kind(value)


def _writable(value: object, where: str, base: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(items, (list, tuple)):
        raise SpecError(f"writable={value!r} {where}: expected a path or a list of paths")
    paths = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise SpecError(f"writable={value!r} {where}: {item!r} is not a path")
        path = os.path.realpath(os.path.join(base, os.fspath(item)))
        if not os.path.isdir(path):
            raise SpecError(f"writable={value!r} {where}: {path} is not an existing directory")
        paths.append(path)
    return tuple(paths)


def _check(name: str, value: Any, where: str, base: str) -> Any:
    if name == "net":
        if value not in NETS:
            raise SpecError(f"net={value!r} {where}: expected one of {', '.join(map(repr, NETS))}")
        return value
    if name == "hostname":
        if not isinstance(value, str) or not _HOSTNAME.match(value) or len(value) > 64:
            raise SpecError(f"hostname={value!r} {where}: expected a host name of letters, digits, '-' and '.' (at most 64)")
        return value
    if name == "writable":
        return _writable(value, where, base)
    if name == "user_namespace":
        if value is not None and not isinstance(value, bool):
            raise SpecError(f"user_namespace={value!r} {where}: expected True, False or None (automatic)")
        return value
    if value is None:
        return None
    if name == "memory":
        return parse_size(value, name, where)
    if name == "pids":
        return _positive(value, name, where, int)
    return _positive(value, name, where, float)  # cpus, timeout


def build_spec(
    values: Mapping[str, Any],
    where: str,
    *,
    base: str = ".",
    allowed: tuple[str, ...] = FIELD_NAMES,
    defaults: Optional[SandboxSpec] = None,
) -> SandboxSpec:
    """Validate ``values`` (keyword arguments from a marker, an option or the API) into a spec."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise SpecError(f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} {where} (known: {', '.join(allowed)})")
    checked = {name: _check(name, value, where, base) for name, value in values.items()}
    return replace(defaults or SandboxSpec(), **checked)
