"""Identity maps for a fresh user namespace.

Rootless we map our own uid/gid to themselves (as bubblewrap and BenchExec do), so ``os.getuid()``,
``$HOME`` and file ownership look the same inside as outside. Root asking for a user namespace gets
the identity map of the whole id range, so every host file keeps a mapped owner; such a map must be
written by a process that still has CAP_SETUID in the *parent* namespace, so a helper forked before
``unshare`` writes it.
"""

from __future__ import annotations

import os

from . import libc

FULL_RANGE = 4294967295


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_identity_maps(uid: int, gid: int) -> None:
    """Rootless: map our own uid/gid; ``deny`` to setgroups first, as the kernel requires."""
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/setgroups", "deny\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def unshare_with_full_map(flags: int) -> None:
    """Root: unshare ``flags | CLONE_NEWUSER`` and have a helper in the old namespace map 0..2^32-1."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    target = os.getpid()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        os.close(done_r)
        status = b"1"
        if os.read(go_r, 1) == b"1":
            try:
                _write(f"/proc/{target}/uid_map", f"0 0 {FULL_RANGE}\n")
                _write(f"/proc/{target}/gid_map", f"0 0 {FULL_RANGE}\n")
                status = b"0"
            except OSError as exc:
                status = str(exc.errno).encode()
        os.write(done_w, status)
        os._exit(0)
    os.close(go_r)
    os.close(done_w)
    try:
        libc.unshare(flags | libc.CLONE_NEWUSER)
        os.write(go_w, b"1")
    finally:
        os.close(go_w)
        answer = os.read(done_r, 16)
        os.close(done_r)
        os.waitpid(helper, 0)
    if answer != b"0":
        err = int(answer) if answer.isdigit() else 1
        raise OSError(err, f"writing the full uid/gid map failed: {os.strerror(err)}")
