"""cgroup v2 driver.

Layout under the process's own cgroup ``<own>``::

    <own>/pytest-isolate-supervisor            the processes that were in <own> (pytest, ...)
    <own>/pytest-isolate-<pid>-<start>/t-<n>   one session per pytest process, one leaf per sandbox

Why the supervisor leaf: cgroup v2's "no internal processes" rule forbids enabling controllers
in ``<own>/cgroup.subtree_control`` while ``<own>`` itself holds processes (only the root
cgroup is exempt), and without that no child gets a memory/cpu/pids/io controller.  So when
enabling fails with EBUSY, every process of ``<own>`` (not only us: xdist workers and the
pytest main process share it) moves into one shared supervisor leaf first.  A process whose
cgroup is that supervisor leaf treats its parent as ``<own>``.  The last session to close
disables the controllers again, moves the processes back and removes the supervisor leaf.

Rootless, ``<own>`` must be delegated (writable ``cgroup.procs`` and ``cgroup.subtree_control``,
as inside ``systemd-run --user --scope -p Delegate=yes``); otherwise the driver asks the user's
systemd manager for a delegated scope (:mod:`pytest_isolate.linux.systemd`) and works in it.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
from typing import Callable, Mapping, Optional

from pytest_isolate.linux import cgroups as cg
from pytest_isolate.linux.cgroups import CgroupError, CgroupFs, Leaf, Limits, Session, Usage

SUPERVISOR = cg.PREFIX + "supervisor"
ENABLE_ORDER = ("memory", "io", "cpu", "pids")
"""Domain controllers first: enabling a threaded one (cpu, pids) in a cgroup that still has
processes would make it a thread root, where memory and io can never be enabled."""
USAGE_FILES = ("memory.peak", "memory.current", "memory.events", "cpu.stat", "pids.peak", "io.stat")

FIX_DELEGATE = (
    "run pytest in a delegated cgroup: systemd-run --user --scope -p Delegate=yes pytest ...; "
    "if there is no user manager (no login session, e.g. CI): sudo loginctl enable-linger $USER; "
    "or run as root"
)
FIX_CONTROLLER = (
    "delegate the controller to your user: sudo systemctl edit user@.service, add the lines "
    "'[Service]' and 'Delegate=cpu cpuset io memory pids', then log in again "
    "(as root: echo +CONTROLLER | sudo tee <parent>/cgroup.subtree_control)"
)


# ---------------------------------------------------------------- pure parsers


def parse_io_stat(text: str) -> tuple[int, int]:
    """``io.stat`` -> (read bytes, written bytes) summed over every device."""
    read = written = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                written += int(value)
    return read, written


def usage_from_files(texts: Mapping[str, Optional[str]], sampled_peak: Optional[int] = None) -> Usage:
    """A :class:`Usage` from the texts of ``USAGE_FILES`` (None for a missing file).

    ``memory.peak`` exists from Linux 5.19; before, ``sampled_peak`` (the largest
    ``memory.current`` seen) stands in and the field is marked as an estimate.
    """
    cpu = cg.parse_keyed(texts.get("cpu.stat") or "")
    events = cg.parse_keyed(texts.get("memory.events") or "")
    io_text = texts.get("io.stat")
    io = parse_io_stat(io_text) if io_text is not None else (None, None)
    peak = cg.parse_int(texts.get("memory.peak"))
    estimated = frozenset({"memory_peak"}) if peak is None and sampled_peak is not None else frozenset()
    return Usage(
        memory_peak=peak if peak is not None else sampled_peak,
        cpu_user=_seconds(cpu.get("user_usec"), 1e6),
        cpu_system=_seconds(cpu.get("system_usec"), 1e6),
        pids_peak=cg.parse_int(texts.get("pids.peak")),
        io_read_bytes=io[0],
        io_write_bytes=io[1],
        oom_kills=events.get("oom_kill") if texts.get("memory.events") is not None else None,
        cpu_throttled=_seconds(cpu.get("throttled_usec"), 1e6),
        estimated=estimated,
    )


def _seconds(value: Optional[int], per_second: float) -> Optional[float]:
    return None if value is None else value / per_second


# ---------------------------------------------------------------- leaf


class V2Leaf(Leaf):
    """One sandbox's cgroup: ``<own>/pytest-isolate-<pid>-<start>/t-<n>``."""

    def __init__(self, fs: CgroupFs, path: str) -> None:
        self.fs = fs
        self.path = path
        self._sampled_peak: Optional[int] = None
        self.opened = cg.OpenFiles(fs)

    def open_usage_files(self) -> None:
        """Open the usage files now, ahead of the test (see cgroups.OpenFiles)."""
        self.opened.open(os.path.join(self.path, n) for n in USAGE_FILES)

    def procs_files(self) -> tuple[str, ...]:
        return (os.path.join(self.path, "cgroup.procs"),)

    def pids(self) -> list[int]:
        return cg.pids_in(self.fs, cg.subtree(self.fs, self.path))

    def usage(self) -> Usage:
        texts = self.opened.read(self.path, USAGE_FILES)
        if texts.get("memory.peak") is None:
            self._sample(cg.parse_int(texts.get("memory.current")))
        return usage_from_files(texts, self._sampled_peak)

    def _sample(self, current: Optional[int]) -> None:
        """Keep the largest ``memory.current`` seen: the best peak before Linux 5.19."""
        if current is not None:
            self._sampled_peak = max(current, self._sampled_peak or 0)

    def kill(self) -> None:
        """``cgroup.kill`` (Linux 5.14) kills the subtree atomically, forks included;
        older kernels: freeze, SIGKILL every pid (frozen tasks still die), thaw."""
        if self.fs.exists(os.path.join(self.path, "cgroup.kill")):
            self._write_quietly("cgroup.kill", "1")
        else:
            self._freeze_and_kill()
        cg.sigkill_until_empty(self.fs, cg.subtree(self.fs, self.path))

    def _freeze_and_kill(self) -> None:
        self._write_quietly("cgroup.freeze", "1")
        try:
            for pid in self.pids():
                self.fs.kill(pid, signal.SIGKILL)
        finally:
            self._write_quietly("cgroup.freeze", "0")

    def _write_quietly(self, name: str, value: str) -> None:
        """Write, but a leaf that vanished meanwhile is not an error."""
        try:
            self.fs.write(os.path.join(self.path, name), value)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise CgroupError(f"cannot write {value!r} to {self.path}/{name}: {e.strerror}") from e

    def try_remove(self) -> bool:
        self.opened.close()
        self.gone = cg.try_rmdir(self.fs, [self.path])
        return self.gone

    def remove(self) -> None:
        self.opened.close()
        if self.pids():
            self.kill()
        cg.rmdir_tree(self.fs, self.path)
        self.gone = True


# ---------------------------------------------------------------- session


class V2Session(Session):
    """``<own>/pytest-isolate-<pid>-<start>`` with every usable controller enabled for leaves."""

    def __init__(self, fs: CgroupFs, own: str) -> None:
        self.fs = fs
        self.own = own
        self.path = _make_session_dir(fs, own)
        _enable(fs, self.path)
        self.controllers = _enabled(fs, self.path)
        self._leaves: list[V2Leaf] = []
        self._made = 0  # leaves made so far: names them t-<n>

    def new_leaf(self, limits: Limits) -> Leaf:
        limits.check()
        cg.require_controllers(limits, self.controllers, self.path, FIX_CONTROLLER)
        self._made += 1
        path = os.path.join(self.path, f"t-{self._made}")
        cg.make_cgroup(self.fs, path)
        leaf = V2Leaf(self.fs, path)
        try:
            apply_limits(self.fs, path, limits)
        except CgroupError:
            leaf.remove()
            raise
        leaf.open_usage_files()
        self._leaves = cg.remember(self._leaves, leaf)
        return leaf

    def remove(self) -> None:
        errors = cg.each(functools.partial(cg.remove_leaf, leaf) for leaf in self._leaves)
        errors += cg.each([lambda: destroy(self.fs, self.path), lambda: restore_own(self.fs, self.own)])
        cg.raise_first(errors)


def apply_limits(fs: CgroupFs, path: str, limits: Limits) -> None:
    """Write ``limits`` into leaf ``path``; swap is off and an OOM kills the whole leaf."""
    if limits.memory is not None:
        cg.write_limit(fs, os.path.join(path, "memory.max"), str(limits.memory))
        if fs.exists(os.path.join(path, "memory.swap.max")):
            cg.write_limit(fs, os.path.join(path, "memory.swap.max"), "0")
        cg.write_limit(fs, os.path.join(path, "memory.oom.group"), "1")
    if limits.cpus is not None:
        quota = cg.cpu_quota_us(limits.cpus)
        cg.write_limit(fs, os.path.join(path, "cpu.max"), f"{quota} {cg.CFS_PERIOD_US}")
    if limits.pids is not None:
        cg.write_limit(fs, os.path.join(path, "pids.max"), str(limits.pids))


def _make_session_dir(fs: CgroupFs, own: str) -> str:
    """mkdir the session directory; a second session in one process gets a ``.<n>`` suffix."""
    base = os.path.join(own, cg.session_name(fs, os.getpid()))
    for n in range(1, 100):
        path = base if n == 1 else f"{base}.{n}"
        try:
            fs.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise CgroupError(f"cannot create a session cgroup next to {base}: 99 exist")


def destroy(fs: CgroupFs, path: str) -> None:
    """Kill everything in the subtree at ``path`` and remove it."""
    dirs = cg.subtree(fs, path)
    if cg.pids_in(fs, dirs):
        if fs.exists(os.path.join(path, "cgroup.kill")):
            fs.write(os.path.join(path, "cgroup.kill"), "1")
        cg.sigkill_until_empty(fs, dirs)
    cg.rmdir_tree(fs, path)


def empty_scope(fs: CgroupFs, scope: str) -> None:
    """Kill what a dead session left in its systemd scope and remove our directories in it;
    the scope itself is systemd's, which collects it once it is empty."""
    for name in fs.listdir(scope):
        if fs.isdir(os.path.join(scope, name)):
            destroy(fs, os.path.join(scope, name))
    cg.sigkill_until_empty(fs, [scope])


# ---------------------------------------------------------------- controllers


def _enabled(fs: CgroupFs, path: str) -> frozenset[str]:
    """Our controllers enabled for the children of ``path``."""
    return frozenset((cg.read_optional(fs, os.path.join(path, "cgroup.subtree_control")) or "").split()) & cg.CONTROLLERS


def _wanted(fs: CgroupFs, path: str) -> list[str]:
    """Our controllers that ``path`` has but does not yet enable for its children."""
    have = (cg.read_optional(fs, os.path.join(path, "cgroup.controllers")) or "").split()
    return [c for c in ENABLE_ORDER if c in have and c not in _enabled(fs, path)]


def _enable(fs: CgroupFs, path: str) -> None:
    """Enable each wanted controller on its own, so one refusal costs only that controller.
    EBUSY (processes in ``path``) propagates: the caller must move them out first."""
    for controller in _wanted(fs, path):
        try:
            fs.write(os.path.join(path, "cgroup.subtree_control"), f"+{controller}")
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise


def enable_ancestors(fs: CgroupFs, root: str, own: str) -> None:
    """Make our controllers reach ``<own>`` where we may (root, or a delegated subtree).

    systemd enables a controller on a slice only when a unit below asks for it, so a job's
    cgroup may get just memory and pids, and a ``Delegate=yes`` scope in system.slice none.
    Slices hold no processes, so the kernel lets us enable the rest top-down; whatever
    fails stays missing and ``new_leaf`` names it with the fix.
    """
    parts = [p for p in os.path.relpath(own, root).split(os.sep) if p not in (".", "")]
    for depth in range(len(parts)):
        parent = os.path.join(root, *parts[:depth])
        child = os.path.join(parent, parts[depth])
        have = (cg.read_optional(fs, os.path.join(child, "cgroup.controllers")) or "").split()
        control = os.path.join(parent, "cgroup.subtree_control")
        for controller in _wanted(fs, parent):
            if controller not in have and fs.writable(control):
                try:
                    fs.write(control, f"+{controller}")
                except OSError:
                    pass


def enable_in_own(fs: CgroupFs, own: str, attempts: int = 5) -> None:
    """Enable the controllers in ``<own>`` after moving its processes to the supervisor leaf.

    Evacuate first, not on EBUSY: the threaded controllers (cpu, pids) can be enabled in a
    cgroup that has processes, which turns it into a thread root where the domain ones
    (memory, io) then fail with EOPNOTSUPP.  The root cgroup may keep its processes.  A
    process appearing meanwhile makes a domain controller fail with EBUSY: evacuate again.
    """
    for _ in range(attempts):
        if _wanted(fs, own) and fs.exists(os.path.join(own, "cgroup.type")) and cg.pids_in(fs, [own]):
            evacuate(fs, own)
        try:
            _enable(fs, own)
            return
        except OSError as e:
            last = e
    raise CgroupError(
        f"cannot enable controllers in {own}/cgroup.subtree_control: {last.strerror} "
        f"(processes keep appearing in {own}). Fix: {FIX_DELEGATE}"
    )


def evacuate(fs: CgroupFs, own: str) -> None:
    """Move every process of ``<own>`` into ``<own>/pytest-isolate-supervisor``."""
    supervisor = os.path.join(own, SUPERVISOR)
    if not fs.isdir(supervisor):
        try:
            fs.mkdir(supervisor)
        except FileExistsError:
            pass
    for pid in cg.pids_in(fs, [own]):
        _move(fs, pid, supervisor)


def _move(fs: CgroupFs, pid: int, target: str) -> None:
    """Move ``pid`` into cgroup ``target``; a process that exited meanwhile is fine."""
    try:
        fs.write(os.path.join(target, "cgroup.procs"), str(pid))
    except OSError as e:
        if e.errno not in (errno.ESRCH, errno.ENOENT):
            raise CgroupError(
                f"cannot move process {pid} into {target}: {e.strerror} (errno {e.errno}); it shares "
                f"pytest's cgroup, which must be emptied to enable controllers. Fix: {FIX_DELEGATE}"
            ) from e


def restore_own(fs: CgroupFs, own: str) -> None:
    """Undo :func:`evacuate` once no live session is left: disable the controllers, move
    the processes back, remove the supervisor leaf.  If a supervisor leaf exists, ``<own>``
    held processes before, hence had none of our controllers enabled: disabling them
    restores it.  Best effort: another session opening right now keeps things as they are."""
    supervisor = os.path.join(own, SUPERVISOR)
    if not fs.isdir(supervisor) or cg.live_sessions(fs, own):
        return
    try:
        for controller in sorted(_enabled(fs, own)):
            fs.write(os.path.join(own, "cgroup.subtree_control"), f"-{controller}")
        for pid in cg.pids_in(fs, [supervisor]):
            _move(fs, pid, own)
    except (OSError, CgroupError):
        return
    cg.rmdir_retry(fs, supervisor)


# ---------------------------------------------------------------- driver


class V2Driver(cg.Driver):
    """cgroup v2: works in the process's own cgroup, delegated to us or obtained from systemd."""

    name = "v2"
    moves_self = True

    def __init__(
        self,
        root: str,
        proc_self_cgroup: str,
        fs: CgroupFs,
        scope_starter: Optional[Callable[[str], object]] = None,
        system_scope_starter: Optional[Callable[[str], object]] = None,
    ) -> None:
        self.root = root
        self.proc_self_cgroup = proc_self_cgroup
        self.fs = fs
        self.scope_starter = scope_starter if scope_starter is not None else _start_scope
        # root: only on the real hierarchy (unit tests inject one or get none)
        self.system_scope_starter = system_scope_starter if system_scope_starter is not None else (
            _start_system_scope if root == "/sys/fs/cgroup" else None)
        self.euid = os.geteuid()
        self._problem: Optional[str] = None
        self._checked = False

    def own_cgroup(self) -> str:
        """Our cgroup's directory; our supervisor leaf counts as its parent."""
        relative = cg.parse_proc_cgroup(self.fs.read(self.proc_self_cgroup)).get("")
        if relative is None or relative.startswith("/.."):
            raise CgroupError(
                f"this process's cgroup v2 path is {relative!r} in {self.proc_self_cgroup}: it is not "
                f"inside the cgroup filesystem at {self.root} (a container without its own cgroup "
                f"namespace?). Fix: run the container with --cgroupns=private"
            )
        path = os.path.join(self.root, relative.lstrip("/")).rstrip("/")
        return os.path.dirname(path) if os.path.basename(path) == SUPERVISOR else path

    def delegated(self, path: str) -> bool:
        """Can we create children in ``path``, move processes in it and enable controllers?"""
        names = ("", "cgroup.procs", "cgroup.subtree_control")
        return all(self.fs.writable(os.path.join(path, n)) for n in names)

    def available(self) -> tuple[bool, str]:
        """Probe once; may move this process into a new systemd scope (see :meth:`_ensure`)."""
        problem = self._ensure()
        return problem is None, problem or f"cgroup v2 at {self.own_cgroup()} (delegated to uid {self.euid})"

    def _ensure(self) -> Optional[str]:
        """None once our own cgroup is usable, else why not; the outcome is cached because
        getting there may have moved this process into a transient systemd scope."""
        if not self._checked:
            self._problem = self._find_problem()
            self._checked = True
        return self._problem

    def _find_problem(self) -> Optional[str]:
        own = self.own_cgroup()
        if self.delegated(own):
            if self.euid == 0 and self._shared(own):
                self._root_scope()
            return None
        if self.fs.read_only(self.root):
            return f"the cgroup filesystem at {self.root} is mounted read-only (a container?). Fix: {FIX_RO}"
        if self.euid == 0:
            return f"{own} is not writable although we are root. Fix: {FIX_RO}"
        return self._try_scope(own)

    def _shared(self, own: str) -> bool:
        """Does ``own`` (or our supervisor leaf in it) hold processes other than us?"""
        me = os.getpid()
        where = [own, os.path.join(own, SUPERVISOR)]
        return any(pid != me for pid in cg.pids_in(self.fs, [d for d in where if self.fs.isdir(d)]))

    def _root_scope(self) -> None:
        """Root in a cgroup shared with other processes (a systemd service such as a CI job):
        leave them alone and take a delegated scope from the system manager (see
        systemd.start_delegated_scope for why); without systemd, they are moved as before."""
        if self.system_scope_starter is None:
            return
        try:
            self.system_scope_starter(self.proc_self_cgroup)
        except CgroupError:
            pass

    def _try_scope(self, own: str) -> Optional[str]:
        """Rootless and not delegated: ask the user's systemd manager for a delegated scope."""
        try:
            self.scope_starter(self.proc_self_cgroup)
        except CgroupError as e:
            return f"cgroup v2: {own} is not delegated to uid {self.euid}, and {e}. Fix: {FIX_DELEGATE}"
        if self.delegated(self.own_cgroup()):
            return None
        return f"cgroup v2: the systemd scope {self.own_cgroup()} is not writable by uid {self.euid}. Fix: {FIX_DELEGATE}"

    def open_session(self) -> V2Session:
        """Remove stale sessions, enable controllers in ``<own>``, create our session."""
        problem = self._ensure()
        if problem is not None:
            raise CgroupError(problem)
        own = self.own_cgroup()
        for stale in cg.stale_sessions(self.fs, own):
            destroy(self.fs, stale)
        scope_parents = set()
        if own.endswith(".scope") and cg.parse_session_name(os.path.basename(own)):
            scope_parents.add(os.path.dirname(own))
        if self.euid == 0:  # where the system manager puts the scopes of root sessions
            scope_parents.add(os.path.join(self.root, "system.slice"))
        for parent in sorted(scope_parents):
            for scope in cg.stale_sessions(self.fs, parent):
                if scope.endswith(".scope"):
                    empty_scope(self.fs, scope)
        enable_ancestors(self.fs, self.root, own)
        enable_in_own(self.fs, own)
        try:
            return V2Session(self.fs, own)
        except OSError as e:
            raise CgroupError(f"cannot create the session cgroup in {own}: {e}. Fix: {FIX_DELEGATE}") from e


FIX_RO = (
    "give the container its own writable cgroup tree: docker run --cgroupns=private --privileged, "
    "or podman run --security-opt unmask=/sys/fs/cgroup"
)


def _start_scope(proc_self_cgroup: str) -> object:
    from pytest_isolate.linux import systemd

    return systemd.start_delegated_scope(proc_self_cgroup)


def _start_system_scope(proc_self_cgroup: str) -> object:
    from pytest_isolate.linux import systemd

    if not os.path.exists(systemd.SYSTEM_PRIVATE) and shutil.which("busctl") is None:
        raise CgroupError("no systemd system manager")
    return systemd.start_delegated_scope(proc_self_cgroup, system=True)
