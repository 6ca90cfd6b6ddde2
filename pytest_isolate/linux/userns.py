"""Identity maps for a fresh user namespace.

Rootless we map our own uid/gid to themselves (as bubblewrap and BenchExec do), so ``os.getuid()``,
``$HOME`` and file ownership look the same inside as outside. Root asking for a user namespace
gets the identity map of the whole id range, so every host file keeps a mapped owner.
"""

from __future__ import annotations

FULL_RANGE = 4294967295


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_identity_maps(uid: int, gid: int) -> None:
    """Write uid_map, ``deny`` to setgroups (required before gid_map when unprivileged), gid_map."""
    if uid == 0:
        _write("/proc/self/uid_map", f"0 0 {FULL_RANGE}\n")
        _write("/proc/self/gid_map", f"0 0 {FULL_RANGE}\n")
        return
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/setgroups", "deny\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
