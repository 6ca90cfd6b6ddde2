"""Per-session facts about this host that every sandbox plan needs, computed once.

The mount plan is read from the supervisor's mountinfo once; a sandbox then only executes it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from ..linux.mounts import Step, plan_root, plan_root_whole, read_mounts
from ..linux.rootfs import RootOptions
from .launch import Plan
from .spec import SandboxSpec

TMPFS_USERXATTR_KERNEL = (6, 6)


def kernel_version() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def user_writable_dirs() -> list[str]:
    """Directories a rootless user can write on the host: each gets an overlay of its own."""
    candidates = ["/tmp", "/var/tmp", "/dev/shm", os.environ.get("HOME", ""), os.environ.get("XDG_RUNTIME_DIR", "")]
    return [d for d in candidates if d and os.path.isdir(d) and os.access(d, os.W_OK)]


@dataclass(frozen=True)
class Host:
    """Who we are and how this host's tree is laid out, for planning sandboxes."""

    uid: int
    gid: int
    plain_steps: tuple[Step, ...]
    userns_steps: tuple[Step, ...]
    tmpfs_userxattr: bool

    @property
    def root(self) -> bool:
        return self.uid == 0

    def uses_userns(self, spec: SandboxSpec) -> bool:
        return not self.root if spec.user_namespace is None else (spec.user_namespace or not self.root)

    def needs_disk_upper(self, spec: SandboxSpec) -> bool:
        return self.uses_userns(spec) and not self.tmpfs_userxattr

    def plan(self, spec: SandboxSpec, *, cwd: str, writable: Sequence[str] = (), upper_bases: tuple[str, ...] = ()) -> Plan:
        userns = self.uses_userns(spec)
        paths = tuple(dict.fromkeys(tuple(spec.writable) + tuple(writable)))
        root = RootOptions(
            steps=self.userns_steps if userns else self.plain_steps,
            writable=paths,
            userxattr=userns,
            upper_bases=upper_bases,
        )
        return Plan(spec=spec, root=root, userns=userns, uid=self.uid, gid=self.gid, cwd=cwd)


@lru_cache(maxsize=1)
def current_host() -> Host:
    mounts = read_mounts()
    return Host(
        uid=os.getuid(),
        gid=os.getgid(),
        plain_steps=plan_root_whole(mounts),
        userns_steps=plan_root(mounts, user_writable_dirs()),
        tmpfs_userxattr=kernel_version() >= TMPFS_USERXATTR_KERNEL,
    )


def disk_upper_dirs() -> tuple[str, ...]:
    """Two fresh directories on disk, in different trees, for overlay upper layers.

    Before kernel 6.6 tmpfs cannot hold the ``user.overlay.*`` xattrs an upper layer needs in a user
    namespace; and an upper may not sit inside its own lower, hence two bases (see RootOptions).
    """
    made = []
    for top in ("/var/tmp", tempfile.gettempdir()):
        base = os.path.join(top, f"pytest-isolate-{os.getuid()}")
        os.makedirs(base, mode=0o700, exist_ok=True)
        made.append(tempfile.mkdtemp(prefix="upper-", dir=base))
    return tuple(made)


