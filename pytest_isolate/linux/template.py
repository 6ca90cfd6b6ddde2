"""A built copy-on-write root, kept in a mount namespace of its own and copied by each sandbox.

Building a root is the bulk of a sandbox's cost: rootless some 45 overlay mounts on a host with
many mounts (each subtree under a locked mount is a layer of its own, see mounts.py), their upper
and work directories, and at the end as many overlay superblocks to tear down. A template is such
a root, built once, without the final ``pivot_root``, in a mount namespace of a session user
namespace (both held here by file descriptors, no process). A sandbox joins both, unshares a mount
namespace — a copy, whose mounts are its own — and only pivots into it.

The copy shares the template's overlays, so a template serves one sandbox at a time, and again only
if that sandbox wrote nothing into the root: every write changes the mtime or ctime of the top of
an upper layer (a copy-up creates an entry there, an attribute change copies it) or of a directory
of the scratch tree (a new name in ``/var``, say). Those are stamped when the template is made and
compared after its sandbox is gone; a template that differs is dropped, never reused. So is one
whose filesystems a sandbox remounted read-only or to another size (a superblock is shared by
every copy).

As root there is no user namespace: a template is a mount namespace only, and the factory itself
joins it and unshares its copy (see factory._build_here).
"""

from __future__ import annotations

import os

from . import libc
from .nsjoin import Namespaces

TYPE_CHECKING = False  # typing costs the factory 1.1 MB of heap: see record.py
if TYPE_CHECKING:
    from typing import Sequence


def _stamps(root: int, paths: Sequence[str]) -> list[tuple[int, int, int, int, int]]:
    """Each path's mtime and ctime, and its filesystem's flags and size limits: ``mount -o
    remount,ro /`` (or ``,size=1m``) in a sandbox changes the superblock its copy shares with the
    template, and no time stamp. One ``statvfs`` per filesystem (rootless, dozens of upper layers
    share one tmpfs)."""
    limits: dict[int, tuple[int, int, int]] = {}
    stamps = []
    for path in paths:
        st = os.stat(path, dir_fd=root, follow_symlinks=False)
        if st.st_dev not in limits:
            fs = os.statvfs(f"/proc/self/fd/{root}/{path}")
            limits[st.st_dev] = (fs.f_flag, fs.f_blocks, fs.f_files)
        stamps.append((st.st_mtime_ns, st.st_ctime_ns, *limits[st.st_dev]))
    return stamps


class Template:
    """The namespaces of a template root (from the process that built it) and its watched
    directories, looked up from that process's root directory (an ``O_PATH`` descriptor: three
    descriptors per template in all, as root two), with their stamps."""

    def __init__(self, builder: int, watched: Sequence[str], userns: bool = True) -> None:
        self.flags = (libc.CLONE_NEWUSER if userns else 0) | libc.CLONE_NEWNS
        self.ns = Namespaces(builder, self.flags, pidfd=False)
        self.paths = [path.lstrip("/") or "." for path in watched]
        try:
            self.root = os.open(f"/proc/{builder}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self.ns.close()
            raise
        try:
            self.stamps = _stamps(self.root, self.paths)
        except OSError:
            self.close()
            raise

    def join(self) -> None:
        """Enter the template's user (rootless) and mount namespaces (then unshare the mount
        namespace: a copy)."""
        self.ns.join(self.flags)

    def untouched(self) -> bool:
        """Whether nothing was written into the root since the template was made (call when the
        sandbox that used it is gone: a process still in it could write after the check)."""
        try:
            return _stamps(self.root, self.paths) == self.stamps
        except OSError:
            return False

    def close(self) -> None:
        self.ns.close()
        if self.root >= 0:
            os.close(self.root)
            self.root = -1
