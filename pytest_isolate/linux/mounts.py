"""Parse ``/proc/self/mountinfo`` and plan a copy-on-write view of the host tree.

Kernel overlayfs refuses a lower directory that has (locked) submounts inside a user namespace
("failed to clone lowerpath"), so the view is planned per subtree: a directory with no mount point
below it becomes one overlay; a directory with mount points below it becomes a plain directory of the
scratch tmpfs whose entries are planned one by one. The plan is pure data, computed once per session.
"""

from __future__ import annotations

import os
import stat

from .record import record

TYPE_CHECKING = False  # typing costs the factory 1.1 MB of heap: see record.py
if TYPE_CHECKING:
    from typing import Iterable, Sequence

# Filesystems that are never used as an overlay lower layer: kernel interfaces and fuse.
SPECIAL_FS = frozenset(
    {
        "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue", "bpf", "tracefs",
        "debugfs", "securityfs", "configfs", "binfmt_misc", "autofs", "nsfs", "pstore", "hugetlbfs",
        "fusectl", "efivarfs", "rpc_pipefs", "selinuxfs",
    }
)
BIND_WHOLE = ("/dev", "/sys")


@record(frozen=True)
class Mount:
    """One line of mountinfo: where it is mounted and its filesystem type."""

    point: str
    fstype: str


@record(frozen=True)
class Step:
    """One action of building the root: ``rootlayer``, ``dir``, ``overlay``, ``rbind``, ``file``,
    ``symlink`` or ``proc``."""

    action: str
    path: str
    target: str = ""


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mount points and filesystem types, in mount order (later lines stack on earlier ones)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        mounts.append(Mount(point=_unescape(fields[4]), fstype=fields[sep + 1]))
    return mounts


def read_mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    with open(path) as f:
        return parse_mountinfo(f.read())


def _is_below(path: str, parent: str) -> bool:
    return parent == "/" or path.startswith(parent.rstrip("/") + "/")


class _Planner:
    def __init__(self, mounts: Sequence[Mount], root: str) -> None:
        self.fstype = {m.point: m.fstype for m in mounts}
        self.points = sorted(self.fstype)
        self.root = root  # prefix of the host tree to scan; "" in real use, a fake tree in tests
        self.steps: list[Step] = []

    def has_mount_below(self, path: str) -> bool:
        return any(p != path and _is_below(p, path) for p in self.points)

    def walk(self, path: str) -> None:
        for name in sorted(os.listdir(self.root + path or "/")):
            self.entry(os.path.join(path, name))

    def entry(self, path: str) -> None:
        fstype = self.fstype.get(path)
        try:
            st = os.lstat(self.root + path)
        except OSError:
            return
        if path == "/proc":
            self.steps.append(Step("proc", path))
        elif path in BIND_WHOLE or fstype in SPECIAL_FS or (fstype or "").startswith("fuse"):
            self.steps.append(Step("rbind", path))
        elif stat.S_ISLNK(st.st_mode):
            self.steps.append(Step("symlink", path, os.readlink(self.root + path)))
        elif stat.S_ISDIR(st.st_mode):
            if self.has_mount_below(path):
                self.steps.append(Step("dir", path))
                self.walk(path)
            else:
                self.steps.append(Step("overlay", path))
        elif stat.S_ISREG(st.st_mode) or fstype is not None:
            self.steps.append(Step("file", path))


def plan_root(mounts: Sequence[Mount], own_overlays: Iterable[str] = (), root: str = "") -> tuple[Step, ...]:
    """Plan the sandbox root for the host tree described by ``mounts``.

    ``own_overlays`` are directories that get an overlay of their own on top of the plan (rootless:
    every directory the user can write, so a copy-up never needs an unmapped parent).
    """
    planner = _Planner(mounts, root)
    planner.walk("/")
    planned = {s.path for s in planner.steps if s.action == "overlay"}
    covered = [s.path for s in planner.steps if s.action in ("overlay", "rbind")]
    extra = []
    for path in sorted(set(own_overlays), key=lambda p: p.count("/")):
        real = os.path.realpath(root + path)[len(root) :] if root else os.path.realpath(path)
        if real in planned or not os.path.isdir(root + real):
            continue
        if any(_is_below(real, c) for c in covered):
            extra.append(Step("overlay", real))
            planned.add(real)
    return tuple(planner.steps) + tuple(extra)


def _skipped(path: str) -> bool:
    covered = ("/proc",) + BIND_WHOLE  # a fresh /proc; /dev and /sys bound whole, submounts included
    return path == "/" or any(path == c or _is_below(path, c) for c in covered)


def plan_root_whole(mounts: Sequence[Mount], extra_overlays: Iterable[str] = ("/dev/shm",), root: str = "") -> tuple[Step, ...]:
    """Plan for root without a user namespace: nothing is locked, so one overlay takes the whole
    root filesystem (a non-recursive bind of ``/`` as its lower) and each other mount gets its own
    layer on top, in mount-point depth order — a handful of mounts instead of one per subtree."""
    fstype = {m.point: m.fstype for m in mounts}
    steps = [Step("rootlayer", "/"), Step("proc", "/proc")]
    steps += [Step("rbind", p) for p in BIND_WHOLE if os.path.isdir(root + p)]
    for path in sorted((p for p in fstype if not _skipped(p)), key=lambda p: (p.count("/"), p)):
        kind = fstype[path]
        if kind in SPECIAL_FS or kind.startswith("fuse"):
            steps.append(Step("rbind", path))
        elif os.path.isdir(root + path):
            steps.append(Step("overlay", path))
        elif os.path.exists(root + path):
            steps.append(Step("file", path))
    steps += [Step("overlay", p) for p in extra_overlays if os.path.isdir(root + p)]
    return tuple(steps)
