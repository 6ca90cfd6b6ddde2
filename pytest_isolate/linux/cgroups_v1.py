"""cgroup v1 driver (also hybrid hosts, whose controllers are all in v1).

Every controller hierarchy (memory, cpu, cpuacct, pids, blkio, freezer; co-mounted ones such
as ``cpu,cpuacct`` share a directory) gets the same layout under the process's own cgroup in
that hierarchy (from ``/proc/self/cgroup``)::

    <own in hierarchy>/pytest-isolate-<pid>-<start>/t-<n>

v1 has no "no internal processes" rule, so nothing has to move.  A forked child joins a leaf
by writing ``0`` into the ``cgroup.procs`` of each hierarchy's leaf.  v1 is never delegated
to unprivileged users: rootless, :meth:`V1Driver.available` refuses with the fix.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping, Optional

from pytest_isolate.linux import cgroups as cg
from pytest_isolate.linux.cgroups import CgroupError, CgroupFs, Leaf, Limits, Session, Usage

JOINED = ("memory", "cpuacct", "pids", "blkio")  # hierarchies every sandbox joins (see V1Leaf)
USAGE_FILES = {
    "memory": ("memory.max_usage_in_bytes", "memory.oom_control"),
    "cpuacct": ("cpuacct.usage", "cpuacct.usage_user", "cpuacct.usage_sys"),  # else cpuacct.stat (see cpu_times)
    "cpu": ("cpu.stat",),
    "pids": ("pids.peak",),
    "blkio": ("blkio.throttle.io_service_bytes",),
}
FIX_ROOTLESS = (
    "cgroup v1 hierarchies are not delegated to unprivileged users. Fix: run as root "
    "(sudo -E pytest ...), or boot the host with cgroup v2 (kernel command line "
    "systemd.unified_cgroup_hierarchy=1) and run systemd-run --user --scope -p Delegate=yes pytest ..."
)
FIX_MOUNT = "mount the hierarchy: sudo mount -t cgroup -o CONTROLLER cgroup /sys/fs/cgroup/CONTROLLER"


# ---------------------------------------------------------------- pure parsers


def parse_blkio_bytes(text: str) -> tuple[int, int]:
    """``blkio.throttle.io_service_bytes`` -> (read, written) summed over devices.

    Lines are ``<major>:<minor> <Op> <bytes>`` plus a final ``Total <bytes>`` line that adds
    every operation together, which is skipped.
    """
    totals = {"Read": 0, "Write": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in totals:
            totals[parts[1]] += int(parts[2])
    return totals["Read"], totals["Write"]


def _sampled_ns(texts: Mapping[str, Optional[str]]) -> Optional[tuple[int, int]]:
    """``cpuacct.usage_user/_sys`` (ns, Linux 4.7) when present and not both zero (nothing sampled)."""
    user = cg.parse_int(texts.get("cpuacct.usage_user"))
    system = cg.parse_int(texts.get("cpuacct.usage_sys"))
    return (user, system) if user is not None and system is not None and user + system else None


def cpu_times(texts: Mapping[str, Optional[str]], ticks_per_second: int) -> tuple[Optional[float], Optional[float]]:
    """(user, system) seconds.

    ``cpuacct.usage`` (ns) is the precise total; the user/system split is only sampled, and
    ``cpuacct.usage_user`` undercounts on a busy machine (measured here: 0.78 s of user time for a
    process that ran 1.00 s, all in user mode, while ``cpuacct.usage`` said 1.003 s). So the total
    comes from ``cpuacct.usage``, divided in the proportions of ``cpuacct.usage_user/_sys`` (Linux
    4.7), else of ``cpuacct.stat`` (USER_HZ ticks), as the kernel itself scales a task's
    utime/stime to its runtime. Without ``cpuacct.usage``, the sampled figures as they are."""
    total = cg.parse_int(texts.get("cpuacct.usage"))
    sampled = _sampled_ns(texts)
    stat = cg.parse_keyed(texts.get("cpuacct.stat") or "")
    user: Optional[int]
    system: Optional[int]
    if sampled is not None:
        user, system, scale = sampled[0], sampled[1], 1e9
    elif "user" in stat and "system" in stat:
        user, system, scale = stat["user"], stat["system"], float(ticks_per_second)
    else:  # absent, or both zero: zero or unknown, as they are
        user, system, scale = cg.parse_int(texts.get("cpuacct.usage_user")), cg.parse_int(texts.get("cpuacct.usage_sys")), 1e9
    if total is not None:
        if user is None or system is None or user + system == 0:
            return total / 1e9, 0.0
        user_share = total * user / (user + system)
        return user_share / 1e9, (total - user_share) / 1e9
    if user is None or system is None:
        return None, None
    return user / scale, system / scale


def usage_from_files(texts: Mapping[str, Optional[str]], ticks_per_second: int = 100) -> Usage:
    """A :class:`Usage` from the texts of the ``USAGE_FILES`` (None for a missing file)."""
    user, system = cpu_times(texts, ticks_per_second)
    oom = cg.parse_keyed(texts.get("memory.oom_control") or "")
    throttled = cg.parse_keyed(texts.get("cpu.stat") or "").get("throttled_time")
    blkio = texts.get("blkio.throttle.io_service_bytes")
    io = parse_blkio_bytes(blkio) if blkio is not None else (None, None)
    return Usage(
        memory_peak=cg.parse_int(texts.get("memory.max_usage_in_bytes")),
        cpu_user=user,
        cpu_system=system,
        pids_peak=cg.parse_int(texts.get("pids.peak")),
        io_read_bytes=io[0],
        io_write_bytes=io[1],
        oom_kills=oom.get("oom_kill"),
        cpu_throttled=None if throttled is None else throttled / 1e9,
    )


# ---------------------------------------------------------------- leaf


class V1Leaf(Leaf):
    """One sandbox: a directory ``t-<n>`` in every hierarchy; ``path`` is the memory one."""

    def __init__(self, fs: CgroupFs, dirs: Mapping[str, str], limits: Optional[Limits] = None) -> None:
        self.fs = fs
        # Each hierarchy joined is a migration, and each directory a mkdir and an rmdir, per test:
        # only those that limit or count something here. cpu counts throttling only under a
        # quota; freezer is not needed (killing the sandbox's init kills everything in it).
        wanted = set(JOINED) | ({"cpu"} if limits is not None and limits.cpus is not None else set())
        self.dirs = {c: d for c, d in dirs.items() if c in wanted}  # every one is joined
        self.path = self.dirs.get("memory") or next(iter(self.dirs.values()), "")
        self.opened = cg.OpenFiles(fs)

    def open_usage_files(self) -> None:
        """Open the usage files now, ahead of the test (see cgroups.OpenFiles)."""
        self.opened.open(os.path.join(self.dirs[c], n) for c, names in USAGE_FILES.items() if c in self.dirs for n in names)

    def distinct_dirs(self) -> list[str]:
        """One directory per hierarchy (co-mounted controllers share one)."""
        return sorted(set(self.dirs.values()))

    def procs_files(self) -> tuple[str, ...]:
        return tuple(os.path.join(d, "cgroup.procs") for d in self.distinct_dirs())

    def self_join_files(self) -> tuple[str, ...]:
        # A thread writing "0" into ``tasks`` moves only itself, and the kernel then skips the
        # global cgroup_threadgroup_rwsem (whose write side waits for an RCU grace period: 10-15 ms
        # on our VMs against 0.4 ms, measured with benchmarks/cgroup_join.py).
        return tuple(os.path.join(d, "tasks") for d in self.distinct_dirs())

    def pids(self) -> list[int]:
        return cg.pids_in(self.fs, [s for d in self.distinct_dirs() for s in cg.subtree(self.fs, d)])

    def usage(self) -> Usage:
        texts: dict[str, Optional[str]] = {}
        for controller, names in USAGE_FILES.items():
            if controller in self.dirs:
                texts.update(self.opened.read(self.dirs[controller], names))
        if "cpuacct" in self.dirs and _sampled_ns(texts) is None:  # old kernels, or nothing sampled yet
            texts.update(cg.files(self.fs, self.dirs["cpuacct"], ("cpuacct.stat",)))
        return usage_from_files(texts, os.sysconf("SC_CLK_TCK"))

    def kill(self) -> None:
        """SIGKILL everything in the leaf until it is empty (forks race with us: each round kills
        what the last one missed; the sandbox's own init is killed first by the supervisor)."""
        cg.sigkill_until_empty(self.fs, [s for d in self.distinct_dirs() for s in cg.subtree(self.fs, d)])

    def try_remove(self) -> bool:
        self.opened.close()
        self.gone = cg.try_rmdir(self.fs, self.distinct_dirs())
        return self.gone

    def remove(self) -> None:
        self.opened.close()
        if self.pids():
            self.kill()
        cg.raise_first(cg.each(functools.partial(cg.rmdir_tree, self.fs, d) for d in self.distinct_dirs()))
        self.gone = True


# ---------------------------------------------------------------- session


class V1Session(Session):
    """``pytest-isolate-<pid>-<start>`` in every hierarchy; leaves ``t-<n>`` below."""

    def __init__(self, fs: CgroupFs, own: Mapping[str, str]) -> None:
        self.fs = fs
        self.paths = _make_session_dirs(fs, own)
        self.controllers = controllers_of(own)
        # a hierarchy co-mounted with cpuset needs cpus/mems copied into each new cgroup
        self._cpuset = {p for p in set(self.paths.values()) if fs.exists(os.path.join(p, "cpuset.cpus"))}
        self._leaves: list[V1Leaf] = []
        self._made = 0  # leaves made so far: names them t-<n>

    def new_leaf(self, limits: Limits) -> Leaf:
        limits.check()
        where = ", ".join(sorted(set(self.paths.values())))
        cg.require_controllers(limits, self.controllers, where, FIX_MOUNT)
        self._made += 1
        name = f"t-{self._made}"
        leaf = V1Leaf(self.fs, {c: os.path.join(p, name) for c, p in self.paths.items()}, limits)
        try:
            _make_leaf_dirs(self.fs, leaf, self._cpuset)
            apply_limits(self.fs, leaf.dirs, limits)
            leaf.open_usage_files()
        except CgroupError:
            leaf.remove()
            raise
        self._leaves = cg.remember(self._leaves, leaf)
        return leaf

    def remove(self) -> None:
        errors = cg.each(functools.partial(cg.remove_leaf, leaf) for leaf in self._leaves)
        errors += cg.each(functools.partial(_destroy, self.fs, p) for p in sorted(set(self.paths.values())))
        cg.raise_first(errors)


def controllers_of(own: Mapping[str, str]) -> frozenset[str]:
    """Which of memory/cpu/pids/io the mounted hierarchies provide (io is blkio in v1)."""
    names = {"memory": "memory", "cpu": "cpu", "pids": "pids", "blkio": "io"}
    return frozenset(names[c] for c in own if c in names)


def _make_session_dirs(fs: CgroupFs, own: Mapping[str, str]) -> dict[str, str]:
    """mkdir the session directory in each hierarchy; {controller: session dir}."""
    name = cg.session_name(fs, os.getpid())
    made: dict[str, str] = {}
    for parent in sorted(set(own.values())):
        made[parent] = _mkdir_unique(fs, os.path.join(parent, name))
    return {c: made[p] for c, p in own.items()}


def _mkdir_unique(fs: CgroupFs, base: str) -> str:
    """mkdir ``base``, or ``base.<n>`` when this process already has a session there."""
    for n in range(1, 100):
        path = base if n == 1 else f"{base}.{n}"
        try:
            fs.mkdir(path)
            _inherit_cpuset(fs, path)
            return path
        except FileExistsError:
            continue
    raise CgroupError(f"cannot create a session cgroup next to {base}: 99 exist")


def _make_leaf_dirs(fs: CgroupFs, leaf: V1Leaf, cpuset: set[str]) -> None:
    for d in leaf.distinct_dirs():
        cg.make_cgroup(fs, d)
        if os.path.dirname(d) not in cpuset:
            continue
        try:
            _inherit_cpuset(fs, d)
        except OSError as e:
            raise CgroupError(f"cannot copy cpuset.cpus/mems into {d}: {e}") from e


def _inherit_cpuset(fs: CgroupFs, path: str) -> None:
    """A hierarchy co-mounted with cpuset starts with empty cpus/mems, and no task can
    join until they are set: copy the parent's."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine = cg.read_optional(fs, os.path.join(path, name))
        if mine is not None and not mine.strip():
            fs.write(os.path.join(path, name), fs.read(os.path.join(os.path.dirname(path), name)).strip())


def apply_limits(fs: CgroupFs, dirs: Mapping[str, str], limits: Limits) -> None:
    """Write ``limits``; memsw (memory+swap, only with swapaccount=1) gets the same value so
    that swapping does not lift the cap.  The memory limit goes first: memsw may never be
    below it."""
    if limits.memory is not None:
        memory = dirs["memory"]
        cg.write_limit(fs, os.path.join(memory, "memory.limit_in_bytes"), str(limits.memory))
        if fs.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):
            cg.write_limit(fs, os.path.join(memory, "memory.memsw.limit_in_bytes"), str(limits.memory))
    if limits.cpus is not None:
        cg.write_limit(fs, os.path.join(dirs["cpu"], "cpu.cfs_period_us"), str(cg.CFS_PERIOD_US))
        cg.write_limit(fs, os.path.join(dirs["cpu"], "cpu.cfs_quota_us"), str(cg.cpu_quota_us(limits.cpus)))
    if limits.pids is not None:
        cg.write_limit(fs, os.path.join(dirs["pids"], "pids.max"), str(limits.pids))


def _destroy(fs: CgroupFs, path: str) -> None:
    """Kill everything in the subtree at ``path`` (one hierarchy) and remove it."""
    dirs = cg.subtree(fs, path)
    if cg.pids_in(fs, dirs):
        cg.sigkill_until_empty(fs, dirs)
    cg.rmdir_tree(fs, path)


# ---------------------------------------------------------------- driver


class V1Driver(cg.Driver):
    """cgroup v1: one session directory per controller hierarchy, root only."""

    name = "v1"

    def __init__(self, root: str, proc_self_cgroup: str, fs: CgroupFs) -> None:
        self.root = root
        self.proc_self_cgroup = proc_self_cgroup
        self.fs = fs

    def own_cgroups(self) -> dict[str, str]:
        """{controller: this process's cgroup directory in that controller's hierarchy}."""
        mine = cg.parse_proc_cgroup(self.fs.read(self.proc_self_cgroup))
        own: dict[str, str] = {}
        for controller, mount in cg.v1_hierarchies(self.fs, self.root).items():
            path = os.path.join(mount, mine.get(controller, "/").lstrip("/")).rstrip("/")
            if self.fs.isdir(path):
                own[controller] = path
        return own

    def available(self) -> tuple[bool, str]:
        own = self.own_cgroups()
        if not own:
            return False, f"cgroup v1: no controller hierarchy of this process found under {self.root}. Fix: {FIX_MOUNT}"
        denied = sorted({p for p in own.values() if not self.fs.writable(p)})
        if denied:
            more = f" (and {len(denied) - 1} more hierarchies)" if len(denied) > 1 else ""
            return False, f"cgroup v1: {denied[0]}{more} not writable by uid {os.geteuid()}: {FIX_ROOTLESS}"
        missing = sorted(set(cg.V1_CONTROLLERS) - set(own))
        note = f" (not mounted: {', '.join(missing)})" if missing else ""
        return True, f"cgroup v1 hierarchies under {self.root}{note}"

    def open_session(self) -> V1Session:
        ok, reason = self.available()
        if not ok:
            raise CgroupError(reason)
        own = self.own_cgroups()
        for parent in sorted(set(own.values())):
            for stale in cg.stale_sessions(self.fs, parent):
                _destroy(self.fs, stale)
        try:
            return V1Session(self.fs, own)
        except OSError as e:
            raise CgroupError(f"cannot create the session cgroups: {e}. Fix: {FIX_ROOTLESS}") from e
