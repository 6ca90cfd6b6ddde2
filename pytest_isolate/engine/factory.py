"""Build sandboxes ahead of time in a small helper process, so a test pays for one fork only.

Forking costs in proportion to the forking process's memory (on our VMs ~0.1 ms per MB), and the
pytest process is the biggest one around. So the namespaces, the copy-on-write root and the init
(PID 1) of the *next* sandbox are made by the factory — an exec'd, small Python process — while the
current test runs; the test's process then only forks and joins them with ``setns``.

As root (no user namespace) the factory builds each sandbox in its own process: it unshares the
namespaces, starts the sandbox's **init** — ``tinyinit``, a 400-byte executable spawned with
``posix_spawn``, PID 1 of the new PID namespace — builds the root around it, sets the hostname,
brings ``lo`` up, gives the init the go to mount ``/proc``, and returns to its own namespaces (fds of
them opened at its start). Mostly it joins a **template** root's mount namespace first (see below)
and, in its copy of it, only pivots into the root: no overlay to mount. The init reaps orphans and
forwards SIGTERM/SIGINT/SIGHUP to PID 2 until it is killed. Killing the init ends the PID namespace
and every process in it; the factory reaps it.

With a user namespace (rootless) the factory can neither point its own children into a new PID
namespace nor come back from the user namespace, so a **holder** child unshares every namespace
(and writes the id maps), then spawns tinyinit and builds the root around it the same way (see
``_build_around_tinyinit`` for what the user namespace changes), and waits for it. Mostly, though,
the holder joins the user and mount namespaces of a **template** root instead and only pivots into
a copy of it (``_holder_from_template``; linux/template.py says when a template may be reused).

Otherwise (the Sandbox API's control socket, no tinyinit for this machine) the factory — rootless:
the holder — forks a Python init, which unshares the other namespaces, builds the root, reports
ready, then reaps and forwards the same way.

Each fork copies the factory's page tables and each sandbox's Python touches (copies) some of its
pages, so the factory imports little (no subprocess, ctypes.util, dataclasses or typing) and
freezes its heap for the garbage collector.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys

from ..linux import holder as native_holder
from ..linux import libc, tinyinit
from ..linux.mounts import Step
from ..linux.net import loopback_up
from ..linux.nsjoin import Namespaces
from ..linux.record import asdict, record, replace
from ..linux.rootfs import NEW, OLD, RootOptions, build_root, enter_root, proc_points
from ..linux.template import Template
from ..linux.userns import unshare_with_full_map, write_identity_maps
from .execd import serve_control  # imported now: after pivot_root (e.g. into an image) nothing can be

TYPE_CHECKING = False  # dataclasses and typing cost every fork of the factory 3 MB: see linux/record.py
if TYPE_CHECKING:
    import subprocess  # the client's only: the factory process, forked per sandbox, stays small
    from typing import IO, Any, NoReturn, Optional

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# the factory's own namespaces, left and come back to when it builds a sandbox itself (see _Workshop)
HOME = libc.CLONE_NEWNS | libc.CLONE_NEWNET | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC | libc.CLONE_NEWCGROUP | libc.CLONE_NEWPID


@record(frozen=True)
class Blueprint:
    """What the factory needs to build one sandbox; equal blueprints make interchangeable sandboxes."""

    userns: bool
    uid: int
    gid: int
    hostname: str
    net: str
    root: RootOptions
    control: bool = False  # the init serves exec requests over a socket (the Sandbox API)
    network: int = 0  # host PID of a network switch whose user namespace the sandbox shares (0: none)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Blueprint":
        data = json.loads(text)
        root = data.pop("root")
        root["steps"] = tuple(Step(**s) for s in root["steps"])
        for key in ("writable", "upper_bases", "layers", "binds"):
                root[key] = tuple(tuple(v) if isinstance(v, list) else v for v in root[key])
        return cls(root=RootOptions(**root), **data)


@record(frozen=True)
class Prepared:
    """A built sandbox waiting for its payload: host PIDs of its holder and init."""

    ident: int
    holder: int
    init: int
    control: Optional[socket.socket] = None  # to the init, when the blueprint asked for it


class SetupFailure(Exception):
    """A step of building the sandbox failed; ``step`` names it, the message has the errno."""

    def __init__(self, step: str, errno: Optional[int], message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step, self.errno, self.message = step, errno, message


# ----------------------------------------------------------------------------- factory process --


def _report(fd: int, **fields: Any) -> None:
    os.write(fd, json.dumps(fields).encode() + b"\n")


def _failure(step: str, exc: BaseException) -> SetupFailure:
    """What a failed step of building a sandbox reports: its errno, if the kernel gave one."""
    if isinstance(exc, SetupFailure):
        return exc
    if isinstance(exc, OSError):
        return SetupFailure(step, exc.errno, str(exc))
    return SetupFailure(step, None, f"{type(exc).__name__}: {exc}")


def _step(fd: int, name: str, func: Any) -> Any:
    """Run one step in a forked holder or init; a failure is reported on ``fd`` and ends it."""
    try:
        return func()
    except BaseException as exc:
        failure = _failure(name, exc)
        _report(fd, step=failure.step, errno=failure.errno, message=failure.message)
    os._exit(1)


def _flags(bp: Blueprint) -> int:
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC | libc.CLONE_NEWPID | libc.CLONE_NEWCGROUP
    if _own_network(bp):
        flags |= libc.CLONE_NEWNET
    return flags


def _own_network(bp: Blueprint) -> bool:
    """Whether the sandbox gets a network namespace (with ``lo`` to bring up): not with net="host"."""
    return bp.net == "none" or bool(bp.network)


def _name_and_loopback(bp: Blueprint, run: Any) -> None:
    """The last steps of every build, whoever builds: the hostname, and ``lo`` up in the sandbox's
    own network namespace. ``run(step, func)`` runs each (``_here`` in the factory, else ``_step``)."""
    run("sethostname", lambda: socket.sethostname(bp.hostname))
    if _own_network(bp):
        run("bring up lo", loopback_up)


def _join_user(pid: int) -> None:
    ns = Namespaces(pid, libc.CLONE_NEWUSER)
    try:
        ns.join(libc.CLONE_NEWUSER)
    finally:
        ns.close()


def join_cgroup(files: tuple[str, ...]) -> None:
    """Join a cgroup leaf by writing ``0`` (the calling process; in cgroup v1 ``tasks``: the
    calling thread, the cheap way, see cgroups_v1) into each of ``files``. Here because the factory
    must stay small: the supervisor's test process joins with it too."""
    for path in files:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot join the cgroup {path}: {exc.strerror}") from None


def _join_cgroup(ready: int, files: tuple[str, ...]) -> None:
    """The init (or holder) joins the sandbox's leaf, before the cgroup namespace is unshared."""
    if files:
        _step(ready, "cgroup limits", lambda: join_cgroup(files))


def _holder(bp: Blueprint, ready: int, control: Optional[socket.socket], join: tuple[str, ...] = (),
            tiny: Optional[str] = None) -> NoReturn:
    """Unshare the user namespace (and the rest), then build the sandbox around a tinyinit here
    (``tiny``: its executable), or fork a Python init that builds it; wait for the init to end."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    _join_cgroup(ready, join)
    if bp.network and bp.userns:
        # a network's members share its user namespace: its switch may then configure their links
        _step(ready, "join the network's user namespace", lambda: _join_user(bp.network))
        _step(ready, "unshare", lambda: libc.unshare(_flags(bp)))
    elif bp.userns and bp.uid == 0:
        _step(ready, "unshare", lambda: unshare_with_full_map(_flags(bp)))
    elif bp.userns:
        _step(ready, "unshare", lambda: libc.unshare(_flags(bp) | libc.CLONE_NEWUSER))
        _step(ready, "write uid_map/gid_map", lambda: write_identity_maps(bp.uid, bp.gid))
    else:
        _step(ready, "unshare", lambda: libc.unshare(_flags(bp)))
    if tiny is not None and control is None and _proc_last(bp.root) and _ambient_sys_admin():
        _build_around_tinyinit(bp, ready, tiny)
    init = os.fork()
    if init == 0:
        _init(bp, ready, control)
    os.close(ready)
    if control is not None:
        control.close()
    os.waitpid(init, 0)
    os._exit(0)


def _ambient_sys_admin() -> bool:
    """Whether CAP_SYS_ADMIN now crosses our next exec (ambient capabilities: Linux 4.3 and later);
    if not, the holder forks a Python init, which needs no exec."""
    try:
        libc.keep_across_exec(libc.CAP_SYS_ADMIN)
    except OSError:
        return False
    return True


def _build_around_tinyinit(bp: Blueprint, ready: int, tiny: str) -> NoReturn:
    """In the holder, in the sandbox's fresh user namespace: start tinyinit as PID 1 and build the
    root around it here, as the factory does as root, instead of forking a Python init (a fork of
    a Python process, its interpreter's page faults and its exit: ~2 ms of CPU per sandbox).

    Two things differ from root. tinyinit is not uid 0 in the namespace, so an exec would drop
    the CAP_SYS_ADMIN it needs to mount ``/proc``: we pass it across as an ambient capability.
    And the kernel mounts a new ``/proc`` in a user namespace only while a fully visible one is in
    the mount namespace (``mnt_too_revealing``): the go comes while the host's tree is still
    attached, before the last ``pivot_root``, with the mount points under the new root's
    staging path. Then we wait for the init: the factory reaps us when it is gone."""
    _around_tinyinit(bp, ready, tiny, lambda mount_proc: build_root(bp.root, mount_proc=False, before_pivot=mount_proc))


def _holder_from_template(bp: Blueprint, ready: int, template: Template, join: tuple[str, ...], tiny: str) -> NoReturn:
    """A holder whose root is a copy of ``template`` (see linux/template.py): join the template's
    user and mount namespaces, unshare the rest and a copy of that mount namespace, start
    tinyinit, let it mount ``/proc`` (the host's is still attached under ``OLD``, and so is the
    memfd that tinyinit executes), and pivot into the root: no overlay to mount."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    _join_cgroup(ready, join)
    _step(ready, "join the template's namespaces", template.join)
    _step(ready, "unshare", lambda: libc.unshare(_flags(bp)))
    _step(ready, "keep CAP_SYS_ADMIN across exec", lambda: libc.keep_across_exec(libc.CAP_SYS_ADMIN))

    def pivot(mount_proc: Any) -> None:
        mount_proc()
        enter_root()

    _around_tinyinit(bp, ready, OLD + tiny, pivot)


def _new_proc_points(bp: Blueprint) -> tuple[str, ...]:
    """Where a holder's tinyinit mounts ``/proc``: under the new root, before the pivot into it."""
    return tuple(NEW + p for p in proc_points(bp.root))


def _around_tinyinit(bp: Blueprint, ready: int, tiny: str, build: Any) -> NoReturn:
    """Start tinyinit (path ``tiny``), then ``build(mount_proc)`` the root, calling ``mount_proc``
    (tinyinit's go, and its answer) while the host's ``/proc`` is still in the mount namespace;
    name the sandbox, bring ``lo`` up, report ready and wait for the init."""
    go_read, go = os.pipe()
    up_read, up = os.pipe()
    points = _new_proc_points(bp)
    init: int = _step(ready, "start the init", lambda: tinyinit.spawn(tiny, points, go_read, up))
    os.close(go_read)
    os.close(up)

    def mount_proc() -> None:
        os.write(go, b"g")
        if os.read(up_read, 1) != b"k":
            raise SetupFailure("init", None, _why(init))  # as the factory reports it as root

    _step(ready, "build root", lambda: build(mount_proc))
    os.close(go)
    os.close(up_read)
    _name_and_loopback(bp, lambda name, func: _step(ready, name, func))
    _report(ready, ok=True)
    os.close(ready)
    os.waitpid(init, 0)
    os._exit(0)


def _template_builder(bp: Blueprint, ready: int) -> NoReturn:
    """Build a template root (see linux/template.py) in a fresh mount namespace (rootless: and user
    namespace), report the directories to watch, and wait to be killed (the factory first opens
    what it keeps)."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if bp.userns:
        _step(ready, "unshare", lambda: libc.unshare(libc.CLONE_NEWUSER | libc.CLONE_NEWNS))
        _step(ready, "write uid_map/gid_map", lambda: write_identity_maps(bp.uid, bp.gid))
    else:
        _step(ready, "unshare", lambda: libc.unshare(libc.CLONE_NEWNS))
    watched = _step(ready, "build root", lambda: build_root(bp.root, mount_proc=False, pivot=False))
    _report(ready, ok=True, watched=list(watched))
    while True:
        signal.pause()


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _fork_init(bp: Blueprint, ready: int, control: Optional[socket.socket], home: Namespaces,
               join: tuple[str, ...] = (), others: tuple[int, ...] = ()) -> int:
    """Without a user namespace (root): fork the init straight into a new PID namespace — no
    holder process to fork, wait for and reap. ``unshare(CLONE_NEWPID)`` only points our next
    child there; we point ours back at once."""
    libc.unshare(libc.CLONE_NEWPID)
    try:
        init = os.fork()
        if init == 0:
            try:
                _close_all(others)
                _join_cgroup(ready, join)
                _step(ready, "unshare", lambda: libc.unshare(_flags(bp) & ~libc.CLONE_NEWPID))
                _init(bp, ready, control)
            finally:
                os._exit(1)
    finally:
        home.join(libc.CLONE_NEWPID)
    return init


def _init(bp: Blueprint, ready: int, control: Optional[socket.socket]) -> NoReturn:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    _step(ready, "build root", lambda: build_root(bp.root))
    _name_and_loopback(bp, lambda name, func: _step(ready, name, func))
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: _forward(signum))
    if control is not None:
        _report(ready, ok=True)
        os.close(ready)
        serve_control(control)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # wait for it, race-free, below
    _report(ready, ok=True)
    os.close(ready)
    while True:
        _reap_all()
        signal.sigtimedwait({signal.SIGCHLD}, 1.0)


def _here(step: str, func: Any) -> Any:
    """Run one step of building a sandbox in the factory itself; a failure becomes a SetupFailure."""
    try:
        return func()
    except Exception as exc:
        raise _failure(step, exc) from None


def _proc_last(root: RootOptions) -> bool:
    """Whether the root's ``/proc`` mounts can wait until the rest is built (nothing goes below one)."""
    points = proc_points(root)
    later = [*root.writable, *(target for _, target in root.binds)]
    return not any(p == q or p.startswith(q.rstrip("/") + "/") for p in later for q in points)


def _reap_all() -> None:
    """Reap every exited child: orphans of the namespace are re-parented to us, PID 1."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _forward(signum: int) -> None:
    try:
        os.kill(2, signum)  # the payload is PID 2 of this namespace
    except ProcessLookupError:
        pass


class _NoTemplates(Exception):
    """The template root was built, but this host does not let the factory keep it."""


class _Build:
    """A sandbox being built: its processes forked, its init not yet ready."""

    __slots__ = ("ident", "bp", "holder", "ours", "cgroup", "tiny", "native")

    def __init__(self, ident: int, bp: Blueprint, holder: int, ours: Optional[socket.socket], cgroup: tuple[str, ...],
                 tiny: bool = False, native: bool = False) -> None:
        self.ident, self.bp, self.holder, self.ours, self.cgroup = ident, bp, holder, ours, cgroup
        self.tiny = tiny  # its init is tinyinit's: it says "k" when ready, else its exit status says why
        self.native = native  # its holder is linux/holder.py's: it answers with a binary record


class _Workshop:
    """The factory's state: sandboxes being built (Python inits several at once, one core each;
    tinyinit sandboxes built here one after another, then waiting for their init's ready), built
    and not yet killed, and holders not yet reaped."""

    def __init__(self, fds: Optional[socket.socket] = None, parent: int = 0) -> None:
        self.building: dict[int, _Build] = {}  # by the read end of its ready pipe
        self.live: dict[int, tuple[int, int, tuple[str, ...]]] = {}
        self.dying: dict[int, tuple[str, ...]] = {}
        self.fds = fds  # where control sockets go to the client (SCM_RIGHTS)
        # The namespaces and root directory we have now (pytest's at our start; a test in the
        # pytest process may unshare later), to come back to: after pointing a Python init's birth
        # into a new PID namespace, and after building a sandbox here (root, tinyinit).
        self.home = Namespaces(os.getpid(), HOME, pidfd=False)
        self.root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.tiny = tinyinit.executable() if parent else None
        self.holder = native_holder.executable() if self.tiny else None  # for sandboxes from templates
        # Rootless: template roots (see linux/template.py), free ones by blueprint (user and
        # root), and the one each holder uses, given back when it is reaped.
        self.templates: dict[str, list[Template]] = {}
        self.template_of: dict[int, tuple[str, Template]] = {}
        # by blueprint: how many templates in a row came back written into, and builds since
        self.written: dict[str, int] = {}
        self.without: dict[str, int] = {}
        self.ambient: Optional[bool] = None  # whether the kernel has ambient capabilities: asked once
        self.keeps = True  # False once this host would not let us keep a template's namespaces

    def _tiny_fits(self, bp: Blueprint, cgroup: Any, join: Any) -> bool:
        """Whether to build in this process around a tinyinit (else fork a Python init)."""
        return bool(self.tiny) and not bp.userns and not bp.control and not cgroup and not join and _proc_last(bp.root)

    def _template_fits(self, bp: Blueprint, cgroup: Any) -> bool:
        """Whether a rootless sandbox is made from a template root (else its holder builds one):
        a tinyinit sandbox of the host tree, with upper layers in memory, its own identity-mapped
        user namespace (not a network's, nor uid 0 with every id mapped)."""
        if not (self.tiny and bp.userns and not bp.control and not bp.network and bp.uid != 0 and not cgroup):
            return False
        if not self._keepable(bp):
            return False
        if self.ambient is None:
            self.ambient = libc.ambient_capabilities()
        return self.ambient

    def _keepable(self, bp: Blueprint) -> bool:
        """Whether ``bp``'s root may come from a template, rootless or as root: the host tree (not
        an image) with its upper layers in memory, ``/proc`` mounted last, on a host that lets us
        keep a template's namespaces."""
        return self.keeps and not (bp.root.upper_bases or bp.root.layers) and _proc_last(bp.root)

    def _root_template(self, bp: Blueprint, others: tuple[int, ...]) -> Optional[tuple[str, Template]]:
        """As root, for a sandbox built here around a tinyinit (see _tiny_fits): a template root to
        copy (as rootless), see _keepable; else None, and this process builds the root (also when
        a template could not be made: the build then says why)."""
        if not self._keepable(bp):
            return None
        try:
            return self._template(bp, others)
        except SetupFailure:
            return None

    def _template(self, bp: Blueprint, others: tuple[int, ...]) -> Optional[tuple[str, Template]]:
        """A clean template for ``bp``: a free one; else, where a killed sandbox still holds one,
        that one once its holder is reaped and if it is still clean; else a new one — or none
        (the holder builds its root itself) where the last templates all came back written into:
        building a template and copying it costs a sandbox that writes more than building its
        root. One build in 16 tries a template again, for when the tests stop writing."""
        key = json.dumps([bp.uid, bp.gid, asdict(bp.root)], sort_keys=True)
        self.reap()
        free = self.templates.setdefault(key, [])
        # Not as root: there the "holder" is the init, and a killed init is not gone until the
        # pytest process has reaped the test process it forked into the sandbox (the kernel keeps
        # PID 1 until every process of its namespace is reaped), so waiting here could wait forever.
        for holder, (used_for, _) in list(self.template_of.items()) if bp.userns else ():
            if free:
                break
            if used_for == key and holder in self.dying:  # its init is killed: gone in a moment
                os.waitpid(holder, 0)
                self._reaped(holder)
        if free:
            return key, free.pop()
        if self.written.get(key, 0) >= 2:
            self.without[key] = self.without.get(key, 0) + 1
            if self.without[key] % 16:
                return None
        try:
            return key, self._new_template(bp, others)
        except _NoTemplates:
            self.keeps = False  # this host won't let us keep one: roots are built, as before
            return None

    def _new_template(self, bp: Blueprint, others: tuple[int, ...]) -> Template:
        read, write = os.pipe()
        builder = os.fork()
        if builder == 0:
            os.close(read)
            _close_all(others)
            _template_builder(bp, write)
        os.close(write)
        data = b""
        try:
            while b"\n" not in data:
                chunk = os.read(read, 65536)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(read)
        try:
            line = data.split(b"\n")[0]
            answer: dict[str, Any] = json.loads(line) if line else {"step": "fork", "errno": None,
                                                                    "message": "the template's builder died"}
            if not answer.get("ok"):
                raise SetupFailure(answer["step"], answer.get("errno"), answer["message"])
            try:
                return Template(builder, answer["watched"], userns=bp.userns)
            except OSError as exc:
                raise _NoTemplates(str(exc)) from None
        finally:
            _kill(builder)
            os.waitpid(builder, 0)

    def _reaped(self, holder: int) -> None:
        """``holder`` is reaped: remove its upper dirs on disk, give back its template if clean."""
        _remove_bases(self.dying.pop(holder))
        key, template = self.template_of.pop(holder, ("", None))
        if template is None:
            return
        free = self.templates.setdefault(key, [])
        clean = template.untouched()
        self.written[key] = 0 if clean else self.written.get(key, 0) + 1
        kept = sum(len(templates) for templates in self.templates.values())
        if clean and len(free) < 3 and kept < 8:  # each holds a root's mounts and a tmpfs
            free.append(template)
        else:
            template.close()

    def _build_here(self, bp: Blueprint, ready: int, template: Optional[Template] = None) -> int:
        """Build a sandbox in the factory itself and start its tinyinit (see tinyinit.py): unshare
        every namespace here, spawn the init (PID 1 of the new PID namespace, sharing none of our
        memory), build the root around it — ``pivot_root`` moves the init's root with ours — then
        give it the go to mount ``/proc`` from inside, and come home. With a ``template``, join its
        mount namespace first: the unshare copies it, and the root is only entered (the host's tree,
        the memfd tinyinit executes included, is under ``OLD`` until then). Returns the init's PID."""
        assert self.tiny is not None
        flags = _flags(bp)
        go_read, go = os.pipe()
        try:
            if template is not None:
                _here("join the template's namespaces", template.join)
            _here("unshare", lambda: libc.unshare(flags))
            tiny = self.tiny if template is None else OLD + self.tiny
            try:
                init: int = _here("start the init", lambda: tinyinit.spawn(tiny, proc_points(bp.root), go_read, ready))
            finally:
                os.close(go_read)
            try:
                if template is None:
                    _here("build root", lambda: build_root(bp.root, mount_proc=False))
                else:
                    _here("enter the root", enter_root)
                _name_and_loopback(bp, _here)
            except SetupFailure:
                _kill(init)
                self.dying[init] = bp.root.upper_bases
                raise
            os.write(go, b"g")
        finally:
            os.close(go)
            self.home.join(flags)  # a failure here leaves us in a sandbox: let it end the factory
            os.fchdir(self.root)
            os.chroot(".")
            os.chdir("/")
        return init

    def start(self, ident: int, bp: Blueprint, cgroup: Any = (), join: Any = ()) -> Optional[dict[str, Any]]:
        """Start building a sandbox; its init is moved into the cgroups whose ``cgroup.procs`` are
        in ``cgroup``, or joins them itself through the files in ``join``. Returns an answer only
        if it failed at once; else :meth:`finish` answers when the ready pipe is readable."""
        try:
            bp = _own_upper_dirs(ident, bp)
        except OSError as exc:
            return {"id": ident, "error": {"step": "upper layers", "errno": exc.errno,
                                           "message": f"cannot make the sandbox's upper layer directory: {exc}"}}
        read, write = os.pipe()
        if self._tiny_fits(bp, cgroup, join):
            kept = self._root_template(bp, (read, *self.building))
            try:
                init = self._build_here(bp, write, kept[1] if kept is not None else None)
            except SetupFailure as exc:
                if kept is not None:
                    kept[1].close()
                os.close(read)
                return {"id": ident, "error": {"step": exc.step, "errno": exc.errno, "message": exc.message}}
            finally:
                os.close(write)
            if kept is not None:
                self.template_of[init] = kept  # given back (or dropped) when the init is reaped
            self.building[read] = _Build(ident, bp, init, None, (), tiny=True)
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if bp.control else (None, None)
        direct = not bp.userns  # root: the init is our child, and its own holder (see _fork_init)
        # the other builds' pipes and sockets stay out of this one (a control socket's end would
        # otherwise never see EOF)
        others = (read, *self.building, *(b.ours.fileno() for b in self.building.values() if b.ours is not None))
        if ours is not None:
            others += (ours.fileno(),)
        template: Optional[tuple[str, Template]] = None
        try:
            if self._template_fits(bp, cgroup):
                template = self._template(bp, others)
            native = template is not None and self.holder is not None and not join
            if native:
                try:
                    holder = self._spawn_holder(bp, write, template[1])  # type: ignore[index]
                except OSError:
                    self.holder, native = None, False  # it cannot start here: fork holders from now on
            if direct:
                holder = _fork_init(bp, write, theirs, self.home, tuple(join), others)
            elif not native:
                holder = os.fork()
        except (OSError, SetupFailure) as exc:
            for fd in (read, write):
                os.close(fd)
            for sock in (ours, theirs):
                if sock is not None:
                    sock.close()
            if template is not None:
                template[1].close()
            failure = _failure("fork", exc)
            return {"id": ident, "error": {"step": failure.step, "errno": failure.errno, "message": failure.message}}
        if holder == 0:
            _close_all(others)
            if template is not None and self.tiny is not None:
                _holder_from_template(bp, write, template[1], tuple(join), self.tiny)
            _holder(bp, write, theirs, tuple(join), self.tiny)
        if template is not None:
            self.template_of[holder] = template
        os.close(write)
        if theirs is not None:
            theirs.close()
        self.building[read] = _Build(ident, bp, holder, ours, tuple(cgroup), native=native)
        return None

    def _spawn_holder(self, bp: Blueprint, ready: int, template: Template) -> int:
        """What _holder_from_template does, by linux/holder.py's executable: no fork of ours."""
        assert self.holder is not None and self.tiny is not None
        tiny_fd = int(self.tiny.rsplit("/", 1)[1])
        tiny = OLD + f"/proc/self/fd/{native_holder.TINY_FD}"  # before the pivot the host's tree is at OLD
        block = native_holder.parameters(_flags(bp), _own_network(bp), bp.hostname, tiny, NEW, _new_proc_points(bp))
        return native_holder.spawn(self.holder, block, template, tiny_fd, ready)

    def finish(self, read: int) -> Optional[dict[str, Any]]:
        """The answer for the sandbox whose ready pipe ``read`` is readable (None if discarded)."""
        b = self.building.pop(read)
        data = b""
        try:
            while (len(data) < native_holder.RECORD.size) if b.native else (b"\n" not in data):
                # the one line the init (or a failing step) writes, or a native holder's record, or EOF
                chunk = os.read(read, 65536)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(read)
        line = data.split(b"\n")[0]
        if b.tiny:
            answer = {"ok": True} if line == b"k" else {"step": "init", "errno": None, "message": _why(b.holder)}
        elif b.native:
            answer = native_holder.answer(data)
        else:
            answer = json.loads(line) if line else {"step": "fork", "errno": None, "message": "the holder died"}
        if b.ident < 0 or not answer.get("ok"):
            if b.ident < 0:
                _kill(b.holder)  # discarded while it was built
            self.dying[b.holder] = b.bp.root.upper_bases
            if b.ours is not None:
                b.ours.close()
            return None if b.ident < 0 else {"id": b.ident, "error": answer}
        if not b.bp.userns:  # forked by _fork_init: the init itself
            init = b.holder
        else:
            with open(f"/proc/{b.holder}/task/{b.holder}/children") as f:
                init = int(f.read().split()[0])
        self.live[b.ident] = (b.holder, init, b.bp.root.upper_bases)
        try:
            for path in b.cgroup:  # what the init starts is then born in the leaf: no migration later
                with open(path, "w") as f:
                    f.write(str(init))
        except OSError as exc:
            self.kill(b.ident)
            if b.ours is not None:
                b.ours.close()
            return {"id": b.ident, "error": {"step": "cgroup limits", "errno": exc.errno,
                                             "message": f"cannot move the sandbox's init into {path}: {exc.strerror}"}}
        if b.ours is not None:  # sent only for a sandbox that is ready: the client pairs it with the answer
            assert self.fds is not None
            socket.send_fds(self.fds, [str(b.ident).encode()], [b.ours.fileno()])
            b.ours.close()
        return {"id": b.ident, "holder": b.holder, "init": init, "control": b.bp.control}

    def kill(self, ident: int) -> None:
        for b in self.building.values():
            if b.ident == ident:
                b.ident = -1  # finish() kills it when it reports; nobody is told
                return
        holder, init, bases = self.live.pop(ident, (0, 0, ()))
        if init:
            _kill(init)
            self.dying[holder] = bases

    def reap(self, block: bool = False) -> None:
        for holder in list(self.dying):
            if os.waitpid(holder, 0 if block else os.WNOHANG)[0]:
                self._reaped(holder)

    def close(self) -> None:
        for b in self.building.values():
            _kill(b.holder)
            self.dying[b.holder] = b.bp.root.upper_bases
        for read in list(self.building):
            os.close(read)
        self.building.clear()
        for ident in list(self.live):
            self.kill(ident)
        self.reap(block=True)
        for templates in self.templates.values():
            for template in templates:
                template.close()
        self.templates.clear()


def _why(init: int) -> str:
    """Why a tinyinit exited before it was ready (left unreaped: reap() does that, or, for a
    holder's tinyinit, whoever inherits it when the holder exits)."""
    info = os.waitid(os.P_PID, init, os.WEXITED | os.WNOWAIT)
    assert info is not None
    return tinyinit.failure(info.si_code == os.CLD_EXITED, info.si_status)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _own_upper_dirs(ident: int, bp: Blueprint) -> Blueprint:
    """``bp`` with upper layers on disk (rootless, kernel < 6.6) in directories of this build's own,
    one in each of the plan's bases.

    Many builds share a plan's bases: sandboxes built ahead (a guess at the next test's plan, two
    for the Sandbox API) and the ones that take their turn. Each build's directories are removed
    when its sandbox is reaped (_remove_bases), so a sandbox discarded unused cannot take the
    upper layers of one that is running: files the test had created stay, new ones fail (ENOENT)."""
    if not bp.root.upper_bases:
        return bp
    made: list[str] = []
    try:
        for base in bp.root.upper_bases:
            os.makedirs(base, mode=0o700, exist_ok=True)  # _remove_bases removes it once it is empty
            n = 0
            while True:
                try:
                    os.mkdir(f"{base}/{ident}.{n}", 0o700)
                    break
                except FileExistsError:  # left by a factory that died before it could remove it
                    n += 1
            made.append(f"{base}/{ident}.{n}")
    except OSError:
        _remove_bases(tuple(made))
        raise
    return replace(bp, root=replace(bp.root, upper_bases=tuple(made)))


def _remove_bases(bases: tuple[str, ...]) -> None:
    """Remove a build's upper layer directories (see _own_upper_dirs), then the plan's base each is
    in if no other build uses it any more (it is made again for the next)."""
    if not bases:
        return
    from ..linux.tree import remove_tree  # only with upper layers on disk: keep it out of the heap

    for base in bases:
        try:
            remove_tree(base)
            os.rmdir(os.path.dirname(base))
        except OSError:
            pass


def serve(stdin: IO[str], stdout: IO[str], parent: int, fds: int = -1) -> None:
    """The factory's loop: JSON requests, one per line, in; one JSON answer per build out, in the
    order the builds finish. Python inits build side by side: a client that orders two such
    sandboxes ahead gets both built on two cores; builds around a tinyinit happen in this process."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return
    if fds >= 0:
        os.set_inheritable(fds, False)  # pass_fds made it inheritable: keep it out of the sandboxes
    os.chdir("/")  # the tinyinits we start keep our cwd: one in the host tree would pin it
    shop = _Workshop(socket.socket(fileno=fds) if fds >= 0 else None, parent)
    blueprints: dict[str, Blueprint] = {}
    gc.freeze()  # what is loaded now lives on: collections in the sandboxes' inits need not touch it

    def answer(reply: Optional[dict[str, Any]]) -> None:
        if reply is not None:
            stdout.write(json.dumps(reply) + "\n")
            stdout.flush()

    requests = stdin.fileno()
    buffered = b""
    try:
        while True:
            ready = select.select([requests, *shop.building], [], [])[0]
            for read in ready:
                if read != requests:
                    answer(shop.finish(read))
            if requests not in ready:
                shop.reap()
                continue
            chunk = os.read(requests, 65536)
            if not chunk:
                return
            *lines, buffered = (buffered + chunk).split(b"\n")
            for line in lines:
                request = json.loads(line)
                if request["op"] == "build":
                    text = request["blueprint"]
                    if text not in blueprints:
                        if len(blueprints) > 32:  # many specs (or Sandboxes: upper layer bases of their own, kernel < 6.6)
                            blueprints.clear()
                        blueprints[text] = Blueprint.from_json(text)
                    answer(shop.start(request["id"], blueprints[text], request.get("cgroup", ()), request.get("join", ())))
                elif request["op"] == "kill":
                    shop.kill(request["id"])
            shop.reap()
    finally:
        shop.close()


# ---------------------------------------------------------------------------------- client side --


def start_helper(module: str, call: str, pass_fds: tuple[int, ...] = ()) -> "subprocess.Popen[str]":
    """A small helper process (the factory, a network's switch): a fresh, isolated interpreter that
    imports only ``pytest_isolate.engine.<module>`` and runs ``call``, talking JSON lines over its
    stdin/stdout. Its own session: a terminal's Ctrl-C goes to pytest, which decides.

    Once ``call`` returns (its cleanup done) it exits at once: the interpreter's teardown would
    cost ~6 ms that pytest waits for at its end, and frees nothing the kernel would not. If
    ``call`` raises, the interpreter prints the traceback and exits as usual."""
    import subprocess

    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys, os; sys.path.insert(0, {package_parent!r}); from pytest_isolate.engine.{module} import serve; "
            f"{call}; sys.stdout.flush(); os._exit(0)")
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, close_fds=True,
        pass_fds=pass_fds, start_new_session=True,
    )


class Factory:
    """The supervisor's handle on its factory process (started on first use, one per pytest process)."""

    def __init__(self) -> None:
        self.fds, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = start_helper("factory", f"serve(sys.stdin, sys.stdout, {os.getpid()}, {theirs.fileno()})",
                                 pass_fds=(theirs.fileno(),))
        theirs.close()
        self.next_id = 0
        self.answers: dict[int, dict[str, Any]] = {}
        self.controls: dict[int, socket.socket] = {}
        self.discarded: list[str] = []  # kill requests, sent with the next build request

    def _send(self, **request: Any) -> None:
        """Send ``request`` and the kill requests held back: each write wakes the factory, which
        then competes for a core with the test that is about to run."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(self.discarded) + json.dumps(request) + "\n")
        self.proc.stdin.flush()
        self.discarded.clear()

    def order(self, blueprint: str, cgroup_procs: tuple[str, ...] = (), join: tuple[str, ...] = ()) -> int:
        """Ask for a sandbox (a ``Blueprint.to_json()``), its init to be moved into the cgroup(s)
        whose ``cgroup.procs`` files are given, or to join them itself through the files in
        ``join`` (Leaf.self_join_files); returns a ticket to ``collect`` later."""
        self.next_id += 1
        self._send(op="build", id=self.next_id, blueprint=blueprint, cgroup=list(cgroup_procs), join=list(join))
        return self.next_id

    def collect(self, ticket: int) -> Prepared:
        """Wait for the sandbox of ``ticket``; raise SetupFailure if it could not be built."""
        assert self.proc.stdout is not None
        while ticket not in self.answers:
            line = self.proc.stdout.readline()
            if not line:
                raise SetupFailure("factory", None, f"the sandbox factory exited with status {self.proc.wait()}")
            answer = json.loads(line)
            self.answers[answer["id"]] = answer
        answer = self.answers.pop(ticket)
        if "error" in answer:
            err = answer["error"]
            raise SetupFailure(err["step"], err.get("errno"), err["message"])
        return Prepared(ticket, answer["holder"], answer["init"], self._control(ticket) if answer.get("control") else None)

    def _control(self, ticket: int) -> socket.socket:
        """The init's control socket, sent by the factory before its answer."""
        while ticket not in self.controls:
            data, fds, _, _ = socket.recv_fds(self.fds, 64, 1)
            if not data:
                raise SetupFailure("factory", None, "the sandbox factory closed its socket")
            self.controls[int(data)] = socket.socket(fileno=fds[0])
        return self.controls.pop(ticket)

    def discard(self, ticket: int) -> None:
        """Kill the sandbox of ``ticket`` (built or not yet collected), with the next request or at
        close: a sandbox being used is ended by killing its init, the factory only reaps it."""
        self.discarded.append(json.dumps({"op": "kill", "id": ticket}) + "\n")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            import subprocess

            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for sock in self.controls.values():
            sock.close()
        self.fds.close()
