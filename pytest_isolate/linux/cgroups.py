"""cgroup drivers: one interface over cgroup v2, cgroup v1 and "none" (stdlib only).

The engine asks :func:`detect` for a :class:`Driver`, opens one :class:`Session` per pytest
process and one :class:`Leaf` per sandbox.  Every leaf lives in a session subtree named
``pytest-isolate-<pid>-<starttime>`` under the process's own cgroup, so a later session can tell
whether the owner is still alive and remove the subtrees of crashed sessions.

All filesystem access goes through :class:`CgroupFs`, and every parser here is a pure function
(text in, numbers out): unit tests drive the drivers on fake cgroup trees.  The version-specific
drivers are in ``cgroups_v1`` and ``cgroups_v2``; ``systemd`` obtains a delegated scope.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, TypeVar

__all__ = [
    "CgroupError",
    "CgroupFs",
    "Driver",
    "Leaf",
    "Limits",
    "NoneDriver",
    "Session",
    "Usage",
    "detect",
]

PREFIX = "pytest-isolate-"
"""Every directory we create starts with this; stale-subtree cleanup relies on it."""

CONTROLLERS = frozenset({"memory", "cpu", "pids", "io"})
CFS_PERIOD_US = 100_000
KILL_TIMEOUT = 10.0
RMDIR_TIMEOUT = 2.0
_SESSION_NAME = re.compile(r"^pytest-isolate-(\d+)-(\d+)(?:\.\d+|\.scope)?$")
_GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH)


class CgroupError(Exception):
    """A cgroup operation failed; the message names the cause, the file and the fix."""


@dataclass(frozen=True)
class Limits:
    """Hard caps for one sandbox; ``None`` leaves that resource unlimited."""

    memory: Optional[int] = None
    cpus: Optional[float] = None
    pids: Optional[int] = None

    def check(self) -> None:
        """Refuse nonsense before anything is written to the kernel."""
        if self.memory is not None and self.memory <= 0:
            raise CgroupError(f"memory limit must be a positive number of bytes, not {self.memory!r}")
        if self.cpus is not None and self.cpus <= 0:
            raise CgroupError(f"cpus limit must be a positive number of CPUs, not {self.cpus!r}")
        if self.pids is not None and self.pids < 1:
            raise CgroupError(f"pids limit must be at least 1, not {self.pids!r}")

    def needs(self) -> dict[str, str]:
        """The controller each requested limit needs, keyed by the limit's name."""
        wanted = {"memory": self.memory, "cpus": self.cpus, "pids": self.pids}
        controller = {"memory": "memory", "cpus": "cpu", "pids": "pids"}
        return {name: controller[name] for name, value in wanted.items() if value is not None}


@dataclass(frozen=True)
class Usage:
    """What the kernel accounted for one leaf; ``None`` where this host cannot tell.

    ``estimated`` names the fields that are estimates rather than exact kernel counters
    (``memory_peak`` from sampled ``memory.current`` on kernels without ``memory.peak``).
    """

    memory_peak: Optional[int]
    cpu_user: Optional[float]
    cpu_system: Optional[float]
    pids_peak: Optional[int]
    io_read_bytes: Optional[int]
    io_write_bytes: Optional[int]
    oom_kills: Optional[int]
    cpu_throttled: Optional[float]
    source: str = "cgroup"
    estimated: frozenset[str] = frozenset()

    @classmethod
    def unknown(cls) -> Usage:
        """A usage with every figure missing (e.g. the leaf is already gone)."""
        return cls(None, None, None, None, None, None, None, None)


class CgroupFs:
    """The filesystem and process operations the drivers use, in one seam.

    The drivers never call ``os`` directly, so unit tests substitute a fake cgroupfs that
    populates new directories with interface files, as the kernel does.
    """

    def read(self, path: str) -> str:
        fd = self.open_read(path)  # no text-file object: a test reads ~8 files
        try:
            return self.pread(fd)
        finally:
            os.close(fd)

    def open_read(self, path: str) -> int:
        """An fd to read ``path`` again and again with :meth:`pread` (see :class:`OpenFiles`)."""
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, fd: int) -> str:
        """The whole text of an interface file as it is now: cgroup files regenerate from offset 0."""
        chunks: list[bytes] = []
        offset = 0
        while True:
            chunk = os.pread(fd, 65536, offset)
            if not chunk:
                return b"".join(chunks).decode("ascii")
            chunks.append(chunk)
            offset += len(chunk)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, path: str, value: str) -> None:
        """Write without O_CREAT: a missing interface file is an error, never a new file."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def subdirs(self, path: str) -> list[str]:
        """Names of the child cgroups: readdir's d_type, no stat per interface file (hot path)."""
        with os.scandir(path) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def writable(self, path: str) -> bool:
        return os.access(path, os.W_OK)

    def read_only(self, path: str) -> bool:
        """Is ``path`` on a read-only mount (a container's cgroupfs)?"""
        try:
            return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def kill(self, pid: int, sig: int) -> None:
        """Send ``sig``; a process that is already gone is fine."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def start_time(self, pid: int) -> Optional[int]:
        """The process's start time in clock ticks since boot, or None when it is gone."""
        try:
            return parse_stat_start_time(self.read(f"/proc/{pid}/stat"))
        except OSError:
            return None

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# ---------------------------------------------------------------- pure parsers


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` -> {controller: path}; the v2 line ``0::/x`` maps ``""``."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                result[controller] = parts[2]
    return result


def parse_keyed(text: str) -> dict[str, int]:
    """Flat keyed files (``cpu.stat``, ``memory.events``, ``memory.oom_control``...)."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            result[parts[0]] = int(parts[1])
    return result


def parse_int(text: Optional[str]) -> Optional[int]:
    """A single-number file; ``max``, empty or missing is None."""
    if text is None or not text.strip().lstrip("-").isdigit():
        return None
    return int(text.strip())


def parse_stat_start_time(text: str) -> int:
    """Field 22 of ``/proc/<pid>/stat``; the command name may contain spaces and ')'."""
    return int(text.rsplit(")", 1)[1].split()[19])


def parse_mount_fstype(mountinfo: str, mount_point: str) -> Optional[str]:
    """The filesystem type mounted at ``mount_point`` (the last, i.e. visible, mount)."""
    found = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) > 4 and _unescape(fields[4]) == mount_point and right:
            found = right.split()[0]
    return found


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_session_name(name: str) -> Optional[tuple[int, int]]:
    """``pytest-isolate-<pid>-<starttime>[.<n>|.scope]`` -> (pid, starttime); other names None."""
    match = _SESSION_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_pids(text: str) -> list[int]:
    """``cgroup.procs`` -> pids."""
    return [int(word) for word in text.split()]


# ---------------------------------------------------------------- shared helpers


def read_optional(fs: CgroupFs, path: str) -> Optional[str]:
    """The file's text, or None when it (or its cgroup) does not exist."""
    try:
        return fs.read(path)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise


def write_limit(fs: CgroupFs, path: str, value: str, fix: str = "") -> None:
    """Write one interface file; failure becomes a CgroupError naming file, value and fix."""
    try:
        fs.write(path, value)
    except OSError as e:
        hint = f" Fix: {fix}" if fix else ""
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror or e} (errno {e.errno}).{hint}") from e


def session_name(fs: CgroupFs, pid: int) -> str:
    """Our session directory's name; the start time tells a reused pid from its owner."""
    return f"{PREFIX}{pid}-{fs.start_time(pid) or 0}"


def owner_alive(fs: CgroupFs, name: str) -> bool:
    """Is the process that created session directory ``name`` still running?"""
    owner = parse_session_name(name)
    return owner is not None and fs.start_time(owner[0]) == owner[1]


def stale_sessions(fs: CgroupFs, parent: str) -> list[str]:
    """Session directories under ``parent`` whose owner is dead."""
    names = fs.listdir(parent) if fs.isdir(parent) else []
    return [os.path.join(parent, n) for n in sorted(names) if parse_session_name(n) and not owner_alive(fs, n)]


def live_sessions(fs: CgroupFs, parent: str) -> list[str]:
    """Session directories under ``parent`` whose owner still runs (ours included)."""
    names = fs.listdir(parent) if fs.isdir(parent) else []
    return [os.path.join(parent, n) for n in sorted(names) if owner_alive(fs, n)]


def subtree(fs: CgroupFs, path: str) -> list[str]:
    """``path`` and every cgroup below it, children before parents (the rmdir order)."""
    try:
        names = fs.subdirs(path)
    except OSError as e:
        if e.errno in _GONE:
            return []
        raise
    below = [d for n in sorted(names) for d in subtree(fs, os.path.join(path, n))]
    return below + [path]


def pids_in(fs: CgroupFs, dirs: Iterable[str]) -> list[int]:
    """Every pid listed in the ``cgroup.procs`` of ``dirs``."""
    found: set[int] = set()
    for d in dirs:
        found.update(parse_pids(read_optional(fs, os.path.join(d, "cgroup.procs")) or ""))
    return sorted(found)


def sigkill_until_empty(fs: CgroupFs, dirs: list[str], timeout: float = KILL_TIMEOUT) -> None:
    """SIGKILL whatever is in ``dirs`` until nothing is left (forks race with us)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = pids_in(fs, dirs)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise CgroupError(f"processes {pids} survived SIGKILL for {timeout:.0f}s in {dirs[-1]}")
        for pid in pids:
            fs.kill(pid, signal.SIGKILL)
        fs.sleep(0.01)


def remove_leaf(leaf: "Leaf") -> None:
    """Remove a leaf at the end of a session: most are gone already (removed while tests ran, or
    one rmdir says so); the rest get the full removal, which kills what is left in them."""
    if not leaf.gone and not leaf.try_remove():
        leaf.remove()


LeafT = TypeVar("LeafT", bound="Leaf")


def remember(leaves: list[LeafT], leaf: LeafT) -> list[LeafT]:
    """A session's leaves with ``leaf`` added and those removed meanwhile forgotten: the list stays
    as short as the leaves alive, however long the run."""
    return [kept for kept in leaves if not kept.gone] + [leaf]


def try_rmdir(fs: CgroupFs, dirs: Iterable[str]) -> bool:
    """rmdir each of ``dirs`` once; False if one is still busy (processes in it, or cgroups below)."""
    for d in dirs:
        try:
            fs.rmdir(d)
        except OSError as e:
            if e.errno in _GONE:
                continue
            if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise CgroupError(f"cannot remove cgroup {d}: {e.strerror} (errno {e.errno})") from e
    return True


def rmdir_tree(fs: CgroupFs, path: str, timeout: float = RMDIR_TIMEOUT) -> None:
    """Remove an empty cgroup subtree bottom-up; retries EBUSY, which the kernel returns
    briefly after the last process died; "already gone" is success."""
    for d in subtree(fs, path):
        rmdir_retry(fs, d, timeout)


def rmdir_retry(fs: CgroupFs, path: str, timeout: float = RMDIR_TIMEOUT) -> None:
    """rmdir one cgroup, retrying EBUSY until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fs.rmdir(path)
            return
        except OSError as e:
            if e.errno in _GONE:
                return
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {path}: {e.strerror} (errno {e.errno})") from e
        fs.sleep(0.02)


def each(actions: Iterable[Callable[[], None]]) -> list[CgroupError]:
    """Run every cleanup action even when one fails; return the failures."""
    errors: list[CgroupError] = []
    for action in actions:
        try:
            action()
        except CgroupError as e:
            errors.append(e)
    return errors


def raise_first(errors: list[CgroupError]) -> None:
    """Raise the first cleanup failure, mentioning how many more there were."""
    if errors:
        more = f" (and {len(errors) - 1} more cleanup failures)" if len(errors) > 1 else ""
        raise CgroupError(f"{errors[0]}{more}") from errors[0]


def make_cgroup(fs: CgroupFs, path: str) -> None:
    """mkdir a cgroup; refusals (EACCES, cgroup.max.descendants' EAGAIN) become CgroupError."""
    try:
        fs.mkdir(path)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror} (errno {e.errno})") from e


def require_controllers(limits: Limits, available: frozenset[str], where: str, fix: str) -> None:
    """Refuse a limit whose controller is not enabled, naming the controller and the fix."""
    for limit, controller in limits.needs().items():
        if controller not in available:
            have = " ".join(sorted(available)) or "none"
            raise CgroupError(
                f"cannot enforce the {limit} limit: the cgroup '{controller}' controller is not "
                f"available in {where} (available: {have}). Fix: {fix}"
            )


def cpu_quota_us(cpus: float) -> int:
    """CFS quota per ``CFS_PERIOD_US`` for ``cpus`` CPUs; the kernel refuses less than 1 ms."""
    return max(1000, round(cpus * CFS_PERIOD_US))


# ---------------------------------------------------------------- interface


class Leaf(ABC):
    """One cgroup (v1: one per hierarchy) that holds exactly one sandbox's processes."""

    gone = False  # removed (by remove or a successful try_remove): the session forgets it

    path: str

    @abstractmethod
    def procs_files(self) -> tuple[str, ...]:
        """Every ``cgroup.procs`` a forked child writes ``0`` into to join this leaf."""

    def self_join_files(self) -> Optional[tuple[str, ...]]:
        """Files a single-threaded process writes ``0`` into to join this leaf itself, where that is
        cheaper than being moved (``procs_files``) by another process; None where it is not."""
        return None

    @abstractmethod
    def usage(self) -> Usage:
        """Accounting so far; callable while the sandbox runs and after it exited."""

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL every process in the leaf, including ones forking as we go."""

    @abstractmethod
    def pids(self) -> list[int]:
        """The processes now in the leaf (and in any cgroup the sandbox made below it)."""

    @abstractmethod
    def remove(self) -> None:
        """Kill leftovers, then remove the leaf; a leaf that is already gone is fine."""

    @abstractmethod
    def try_remove(self) -> bool:
        """Remove the leaf if nothing is in it any more: no killing, no waiting (a few rmdir
        calls). False if it is busy — its processes still dying, say; try again later."""


class Session(ABC):
    """The subtree of one pytest process (or xdist worker): one leaf per sandbox."""

    controllers: frozenset[str]
    """Which of memory/cpu/pids/io limits and accounting can use."""

    @abstractmethod
    def new_leaf(self, limits: Limits) -> Leaf:
        """A fresh leaf with ``limits`` applied; CgroupError when a limit cannot be set."""

    @abstractmethod
    def remove(self) -> None:
        """Remove every leaf and the session subtree."""


class Driver(ABC):
    """One per cgroup flavour of the host: ``v1``, ``v2`` or ``none``."""

    name: str
    # Whether available()/open_session() may move this process to another cgroup (v2: into a
    # systemd scope, or out of a cgroup that other processes share), so that a helper process
    # started before stays behind: the plugin starts its factory early only where not.
    moves_self = False

    @abstractmethod
    def open_session(self) -> Session:
        """Remove stale subtrees of dead sessions, then create ours."""

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(can limits be enforced here?, why not and the command that fixes it)."""


class NoneDriver(Driver):
    """The host has no usable cgroups: no limits, accounting comes from elsewhere."""

    name = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def available(self) -> tuple[bool, str]:
        return False, self.reason

    def open_session(self) -> Session:
        raise CgroupError(self.reason)


# ---------------------------------------------------------------- detection

INSIDE_ENV = "PYTEST_ISOLATE_SANDBOX"  # set in every sandbox's processes
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer")


def detect(
    root: str = "/sys/fs/cgroup",
    proc_self_cgroup: str = "/proc/self/cgroup",
    *,
    mountinfo: str = "/proc/self/mountinfo",
    fs: Optional[CgroupFs] = None,
) -> Driver:
    """The driver for the cgroup filesystem at ``root``.

    A cgroup2 mount at ``root`` means v2; a tmpfs holding v1 controller hierarchies means v1
    (hybrid hosts, whose cgroup2 sits at ``root/unified``, count as v1: the controllers are
    in v1).  When ``root`` is not a mount point at all (a fake tree in unit tests) the
    tree's shape decides: ``cgroup.controllers`` at the top is v2.
    """
    if os.environ.get(INSIDE_ENV) and fs is None:
        # Our cgroup namespace hides where we are, and owners of other sessions are invisible from
        # this PID namespace: stale-session cleanup could take theirs. The outer leaf counts us.
        return NoneDriver(f"inside a pytest-isolate sandbox ({INSIDE_ENV} is set): nested sandboxes get "
                          f"no cgroup of their own; the outer sandbox's cgroup limits and counts them")
    fs = fs or CgroupFs()
    kind, reason = _kind(root, _mount_fstype(fs, mountinfo, root), fs)
    if kind == "v2":
        from pytest_isolate.linux.cgroups_v2 import V2Driver

        return V2Driver(root, proc_self_cgroup, fs)
    if kind == "v1":
        from pytest_isolate.linux.cgroups_v1 import V1Driver

        return V1Driver(root, proc_self_cgroup, fs)
    return NoneDriver(reason)


def _mount_fstype(fs: CgroupFs, mountinfo: str, root: str) -> Optional[str]:
    """fstype of the mount at ``root``; None when ``root`` is no mount point (or unknown)."""
    try:
        return parse_mount_fstype(fs.read(mountinfo), os.path.realpath(root))
    except OSError:
        return None


def _kind(root: str, fstype: Optional[str], fs: CgroupFs) -> tuple[str, str]:
    """("v2" | "v1" | "none", reason when none) from the mount type and the tree's shape."""
    if fstype == "cgroup2" or (fstype is None and fs.exists(os.path.join(root, "cgroup.controllers"))):
        return "v2", ""
    if fstype in (None, "tmpfs") and v1_hierarchies(fs, root):
        return "v1", ""
    found = f"a {fstype} filesystem" if fstype else ("nothing" if not fs.isdir(root) else "no cgroup hierarchy")
    return "none", (
        f"no cgroup filesystem at {root} (found {found}): cgroup limits and accounting are off. "
        f"Fix: mount it (sudo mount -t cgroup2 none {root}); in a container, run it with "
        f"--cgroupns=private or --privileged"
    )


def v1_hierarchies(fs: CgroupFs, root: str) -> dict[str, str]:
    """{controller: hierarchy directory} for the v1 controllers mounted under ``root``.

    Hierarchies are found by directory name (``memory``, ``cpu,cpuacct``...), co-mounted
    controllers share one directory; symlinks such as ``cpu -> cpu,cpuacct`` are resolved.
    """
    found: dict[str, str] = {}
    names = fs.listdir(root) if fs.isdir(root) else []
    for name in sorted(names):
        path = os.path.realpath(os.path.join(root, name))
        if fs.exists(os.path.join(path, "cgroup.procs")) and not fs.exists(os.path.join(path, "cgroup.controllers")):
            for controller in set(name.split(",")) & set(V1_CONTROLLERS):
                found.setdefault(controller, path)
    return found


def files(fs: CgroupFs, directory: str, names: Iterable[str]) -> Mapping[str, Optional[str]]:
    """{name: text or None} for the interface files ``names`` in ``directory``."""
    return {name: read_optional(fs, os.path.join(directory, name)) for name in names}


class OpenFiles:
    """A leaf's usage files, opened when the leaf is made (ahead of its test) and read with one
    ``pread`` each when the test ends: the read is on the path between two tests, and an open and
    a close per file (of ~8) cost as much as the read. A file not held open (none yet, none any
    more, or the fds ran out) is read the usual way."""

    def __init__(self, fs: CgroupFs) -> None:
        self.fs = fs
        self.fds: dict[str, Optional[int]] = {}

    def open(self, paths: Iterable[str]) -> None:
        """Hold ``paths`` open; if they cannot all be (out of fds, say), hold none."""
        try:
            for path in paths:
                try:
                    self.fds[path] = self.fs.open_read(path)
                except OSError as e:
                    if e.errno not in _GONE:
                        raise
                    self.fds[path] = None  # a file this kernel does not have
        except OSError:
            self.close()

    def read(self, directory: str, names: Iterable[str]) -> dict[str, Optional[str]]:
        """Like :func:`files`."""
        texts: dict[str, Optional[str]] = {}
        for name in names:
            path = os.path.join(directory, name)
            if path not in self.fds:
                texts[name] = read_optional(self.fs, path)
                continue
            fd = self.fds[path]
            try:
                texts[name] = None if fd is None else self.fs.pread(fd)
            except OSError as e:
                if e.errno not in _GONE:
                    raise
                texts[name] = None
        return texts

    def close(self) -> None:
        for fd in self.fds.values():
            if fd is not None:
                self.fs.close(fd)
        self.fds.clear()
