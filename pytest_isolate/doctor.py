"""``python -m pytest_isolate doctor``: the host's isolation features, each with why and the fix.

Exit status 0 when full isolation is available, 1 when something required is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Optional, Sequence

from .engine.explain import CONTAINER_FIX, in_container, userns_blocker
from .linux.probe import Capabilities, Feature, probe, relay_feature


def why_and_fix(feature: Feature) -> tuple[str, str]:
    """The cause of a missing feature and the command that fixes it."""
    if feature.name.endswith("namespace") or feature.name in ("loopback network", "hostname"):
        return userns_blocker()
    if "unshare(" in feature.detail:  # the probe never got as far as its own step
        return userns_blocker()
    if feature.name == "fresh /proc":
        if in_container():
            return ("the container masks parts of /proc, so the kernel refuses a new proc mount", CONTAINER_FIX)
        return ("a fresh /proc cannot be mounted (masked or over-mounted /proc)", "unmask /proc (containers: --security-opt systempaths=unconfined)")
    if feature.name == "overlay mount":
        return ("overlayfs refused a mount in this namespace (needs kernel >= 5.11 rootless)",
                "upgrade the kernel, run as root, or install fuse-overlayfs (apt-get install fuse-overlayfs)")
    if feature.name == "tmpfs upper layer":
        return ("tmpfs holds user xattrs only from kernel 6.6", "nothing to do: upper layers go to disk under /var/tmp and /tmp")
    if feature.name == "cgroup limits":
        cause, _, fix = feature.detail.partition(" Fix: ")
        if in_container() and "no controller hierarchy" in cause:
            fix = "give the container its cgroups: docker run --cgroupns=private --privileged (or podman run --security-opt unmask=/sys/fs/cgroup)"
        return (cause, fix or "run as root, or on cgroup v2: systemd-run --user --scope -p Delegate=yes pytest ...")
    if feature.name == "user namespace sysctls":
        return userns_blocker()
    if feature.name == "cgroup version":
        cause, _, fix = feature.detail.partition(" Fix: ")
        return (cause, fix or "mount cgroup2: sudo mount -t cgroup2 none /sys/fs/cgroup")
    if feature.name == "systemd user manager":
        return (f"{feature.detail}: rootless on cgroup v2 the plugin asks it for a delegated scope",
                "sudo loginctl enable-linger $USER (and log in once), or export XDG_RUNTIME_DIR=/run/user/$(id -u)")
    if feature.name == "native relay":
        fix = ("unset PYTEST_ISOLATE_NATIVE_RELAY" if "=0" in feature.detail
               else "nothing to do: there is one for x86_64 with glibc only")
        return ("optional: rootless, each test then forks a relay copy of pytest, about 1.5 ms more per test", fix)
    if feature.name == "fuse-overlayfs":
        return ("optional", "apt-get install fuse-overlayfs")
    return ("unknown", "see the detail")


def render(caps: Capabilities) -> str:
    who = "root" if caps.root else f"uid {os.getuid()} (rootless)"
    lines = [f"pytest-isolate doctor: kernel {caps.kernel}, {who}", ""]
    width = max(len(f.name) for f in caps.features) + 2
    for f in caps.features:
        status = "ok" if f.ok else ("MISSING" if f.required else "no")
        lines.append(f"  {f.name:<{width}}{status:<9}{f.detail}")
        if not f.ok:
            why, fix = why_and_fix(f)
            lines.append(f"  {'':<{width}}{'':<9}why: {why}")
            lines.append(f"  {'':<{width}}{'':<9}fix: {fix}")
    lines.append("")
    if caps.full:
        lines.append("verdict: full isolation is available")
    else:
        lines.append("verdict: full isolation is NOT available; missing: " + ", ".join(f.name for f in caps.missing))
    return "\n".join(lines)


def as_json(caps: Capabilities) -> str:
    data = asdict(caps)
    data["full"] = caps.full
    for f in data["features"]:
        if not f["ok"]:
            f["why"], f["fix"] = why_and_fix(Feature(**{k: f[k] for k in ("name", "ok", "detail", "errno", "required")}))
    return json.dumps(data, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_isolate")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="print which isolation features this host supports, and the fixes")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    found = probe()
    caps = Capabilities(found.root, found.kernel, (*found.features, relay_feature()))
    sys.stdout.write((as_json(caps) if args.json else render(caps)) + "\n")
    return 0 if caps.full else 1
