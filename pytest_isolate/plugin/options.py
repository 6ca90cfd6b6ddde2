"""Session-wide settings: one help text per setting, shared by the option, the ini key and the env var.

Precedence, documented: marker > command line > environment > ini. Every value is validated where
it is read, and an error names its source ("memory='256Q' from command line (--isolate-memory)").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import pytest

from ..engine.spec import SandboxSpec, SpecError, build_spec

LIMITS = {
    "memory": "memory limit of each isolated test, e.g. 256M or 1.5G (binary units: 1K = 1024 bytes)",
    "cpus": "CPU limit of each isolated test in CPUs, e.g. 1.5 (a CFS quota)",
    "pids": "maximum number of processes (and threads) in each isolated test",
    "timeout": "wall-clock limit of each isolated test in seconds; the whole sandbox is killed",
}
POLICIES = ("fail", "skip", "degrade")
UNAVAILABLE_HELP = (
    "what to do when requested isolation or limits cannot be had on this host: fail the test (default), "
    "skip it, or degrade (run it with what is available and a warning); the reason is always given"
)
CGROUP_MODES = ("auto", "off")
CGROUPS_HELP = (
    "auto (default): give each isolated test a cgroup leaf where the host allows (limits, exact "
    "accounting); off: never use cgroups (no limits; figures are estimates; a little faster)"
)
OVERLAP_MODES = ("on", "off")
OVERLAP_HELP = (
    "on (default): start the next isolated test's process while this test's reports are logged, where "
    "nothing in the pytest process stands between the two tests; off: one test after the other"
)
JSON_HELP = "write every isolated test's usage (and a header describing the host) to this JSON file"
TOP_HELP = "show the N isolated tests that used the most memory and the most CPU (0: all)"


def env_name(name: str) -> str:
    return f"PYTEST_ISOLATE_{name.upper()}"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate")
    for name, help_text in LIMITS.items():
        group.addoption(f"--isolate-{name}", dest=f"isolate_{name}", default=None, metavar="VALUE", help=help_text)
        parser.addini(f"isolate_{name}", help_text, default=None)
    group.addoption("--isolate-unavailable", dest="isolate_unavailable", choices=POLICIES, default=None, help=UNAVAILABLE_HELP)
    parser.addini("isolate_unavailable", UNAVAILABLE_HELP, default=None)
    group.addoption("--isolate-cgroups", dest="isolate_cgroups", choices=CGROUP_MODES, default=None, help=CGROUPS_HELP)
    parser.addini("isolate_cgroups", CGROUPS_HELP, default=None)
    group.addoption("--isolate-overlap", dest="isolate_overlap", choices=OVERLAP_MODES, default=None, help=OVERLAP_HELP)
    parser.addini("isolate_overlap", OVERLAP_HELP, default=None)
    group.addoption("--isolate-json", dest="isolate_json", default=None, metavar="PATH", help=JSON_HELP)
    group.addoption("--isolate-top", dest="isolate_top", type=int, default=None, metavar="N", help=TOP_HELP)


def _lookup(config: pytest.Config, name: str) -> tuple[Optional[str], str]:
    """The raw value of a setting and where it came from, by precedence."""
    value = config.getoption(f"isolate_{name}")
    if value is not None:
        return str(value), f"from command line (--isolate-{name})"
    if os.environ.get(env_name(name)):
        return os.environ[env_name(name)], f"from environment ({env_name(name)})"
    ini = config.getini(f"isolate_{name}")
    if ini not in (None, ""):
        return str(ini), f"from ini (isolate_{name})"
    return None, ""


def _coerce(name: str, text: str, where: str) -> Any:
    if name == "memory":
        return text
    try:
        return int(text) if name == "pids" else float(text)
    except ValueError:
        kind = "a positive integer" if name == "pids" else "a positive number"
        raise SpecError(f"{name}={text!r} {where}: expected {kind}") from None


@dataclass(frozen=True)
class Settings:
    """The session's defaults for isolated tests and how to treat what is unavailable."""

    defaults: SandboxSpec
    policy: str
    cgroups: str = "auto"
    overlap: bool = True


def read_settings(config: pytest.Config) -> Settings:
    spec = SandboxSpec()
    for name in LIMITS:
        text, where = _lookup(config, name)
        if text is not None:
            spec = build_spec({name: _coerce(name, text, where)}, where, defaults=spec)
    policy, where = _lookup(config, "unavailable")
    if policy is not None and policy not in POLICIES:
        raise SpecError(f"unavailable={policy!r} {where}: expected one of {', '.join(POLICIES)}")
    cgroups, where = _lookup(config, "cgroups")
    if cgroups is not None and cgroups not in CGROUP_MODES:
        raise SpecError(f"cgroups={cgroups!r} {where}: expected one of {', '.join(CGROUP_MODES)}")
    overlap, where = _lookup(config, "overlap")
    if overlap is not None and overlap not in OVERLAP_MODES:
        raise SpecError(f"overlap={overlap!r} {where}: expected one of {', '.join(OVERLAP_MODES)}")
    return Settings(spec, policy or "fail", cgroups or "auto", overlap != "off")
