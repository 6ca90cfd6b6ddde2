"""Start a sandbox by forking, supervise it, and collect how it ended.

Three processes, each with one job (see docs/explanation/how-it-works):

* the **outer** child (forked from the supervisor): unshares the namespaces — after fork, because
  ``unshare(CLONE_NEWUSER)`` fails in a multi-threaded process — writes the id maps, forks the init
  and relays a SIGTERM from the supervisor as SIGKILL to it;
* the **init**, PID 1 of the new PID namespace: builds the root (a fresh ``/proc`` must be mounted
  from inside the namespace), sets the hostname, brings ``lo`` up, forks the payload, reaps every
  orphan, forwards SIGTERM/SIGINT/SIGHUP, and exits the moment the payload exits — which makes the
  kernel kill everything left in the namespace;
* the **payload**, PID 2: runs the target callable.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Optional

from ..linux import libc
from ..linux.net import loopback_up
from ..linux.rootfs import RootOptions, build_root
from ..linux.userns import unshare_with_full_map, write_identity_maps
from .channel import Channel
from .spec import SandboxSpec

SETUP_FAILED = 125
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
KILL_GRACE = 5.0


class SetupFailure(Exception):
    """A step of building the sandbox failed; ``step`` names it, the message has the errno."""

    def __init__(self, step: str, errno: Optional[int], message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step, self.errno, self.message = step, errno, message


@dataclass(frozen=True)
class Plan:
    """Everything the child needs to build one sandbox, decided in the supervisor before fork."""

    spec: SandboxSpec
    root: RootOptions
    userns: bool
    uid: int
    gid: int
    cwd: str
    cgroup_procs: tuple[str, ...] = ()  # cgroup.procs files the outer child joins before unsharing


@dataclass
class Outcome:
    """How a sandbox ended: the payload's wait status (if it got that far) and the supervisor's view."""

    status: Optional[int] = None
    setup_error: Optional[SetupFailure] = None
    timed_out: bool = False
    interrupted: bool = False
    wall: float = 0.0
    rusage: Optional[resource.struct_rusage] = None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> Optional[int]:
        return os.WEXITSTATUS(self.status) if self.status is not None and os.WIFEXITED(self.status) else None

    @property
    def signal(self) -> Optional[int]:
        return os.WTERMSIG(self.status) if self.status is not None and os.WIFSIGNALED(self.status) else None


def _step(chan: Channel, name: str, func: Callable[[], Any]) -> Any:
    try:
        return func()
    except OSError as exc:
        chan.send("setup-error", step=name, errno=exc.errno, message=str(exc))
        os._exit(SETUP_FAILED)
    except BaseException as exc:
        chan.send("setup-error", step=name, errno=None, message=f"{type(exc).__name__}: {exc}")
        os._exit(SETUP_FAILED)


def _alive(pid: int) -> bool:
    # /proc is still the host's here (the sandbox's own is mounted later), and a parent in another
    # PID namespace shows as getppid() == 0, so ask /proc whether the parent is a zombie.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _die_with_parent(parent: int) -> None:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if not _alive(parent):  # the parent died before prctl took effect
        os._exit(SETUP_FAILED)


def _join_cgroups(files: tuple[str, ...]) -> None:
    for path in files:
        with open(path, "w") as f:
            f.write("0\n")  # "0" means the writing process


def _namespace_flags(plan: Plan) -> int:
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC | libc.CLONE_NEWPID | libc.CLONE_NEWCGROUP
    if plan.spec.net == "none":
        flags |= libc.CLONE_NEWNET
    if plan.userns:
        flags |= libc.CLONE_NEWUSER
    return flags


def _outer(plan: Plan, chan: Channel, target: Callable[[Channel], int], parent: int) -> NoReturn:
    _step(chan, "prctl(PR_SET_PDEATHSIG)", lambda: _die_with_parent(parent))
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only; it decides
    _step(chan, "join cgroup", lambda: _join_cgroups(plan.cgroup_procs))
    if plan.userns and plan.uid == 0:
        _step(chan, "unshare", lambda: unshare_with_full_map(_namespace_flags(plan)))
    else:
        _step(chan, "unshare", lambda: libc.unshare(_namespace_flags(plan)))
        if plan.userns:
            _step(chan, "write uid_map/gid_map", lambda: write_identity_maps(plan.uid, plan.gid))
    me = os.getpid()
    init = os.fork()
    if init == 0:
        _init(plan, chan, target, me)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL))
    _, status = os.waitpid(init, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _init(plan: Plan, chan: Channel, target: Callable[[Channel], int], parent: int) -> NoReturn:
    _step(chan, "prctl(PR_SET_PDEATHSIG)", lambda: _die_with_parent(parent))
    _step(chan, "build root", lambda: build_root(plan.root))
    _step(chan, "chdir", lambda: _chdir(plan.cwd))
    _step(chan, "sethostname", lambda: socket.sethostname(plan.spec.hostname))
    if plan.spec.net == "none":
        _step(chan, "bring up lo", loopback_up)
    previous = {sig: signal.getsignal(sig) for sig in FORWARDED}
    payload = os.fork()
    if payload == 0:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _payload(chan, target)
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: os.kill(payload, signum))
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == payload:
            chan.send("exit", status=status)
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _chdir(cwd: str) -> None:
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def _payload(chan: Channel, target: Callable[[Channel], int]) -> NoReturn:
    code = 1
    try:
        code = target(chan)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code)


def _wait(pid: int, deadline: Optional[float]) -> bool:
    """Block until ``pid`` exits or ``deadline`` (monotonic) passes; True if it exited."""
    if deadline is None:
        return True
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        fd = -1
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if fd >= 0:
                if select.select([fd], [], [], left)[0]:
                    return True
            else:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
                time.sleep(min(left, 0.01))
    finally:
        if fd >= 0:
            os.close(fd)


def stop(pid: int) -> None:
    """Ask the outer child to SIGKILL the init (and so the whole PID namespace); SIGKILL it if it hangs."""
    try:
        os.kill(pid, signal.SIGTERM)
        if not _wait(pid, time.monotonic() + KILL_GRACE):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(plan: Plan, target: Callable[[Channel], int], *, kill: Optional[Callable[[], None]] = None) -> Outcome:
    """Run ``target`` as PID 2 of a new sandbox and wait for it (with ``plan.spec.timeout``)."""
    chan = Channel()
    outcome = Outcome()
    parent = os.getpid()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _outer(plan, chan, target, parent)
        finally:
            os._exit(SETUP_FAILED)
    try:
        timeout = plan.spec.timeout
        if not _wait(pid, None if timeout is None else start + timeout):
            outcome.timed_out = True
            (kill or (lambda: stop(pid)))()
            stop(pid)
        _, status, outcome.rusage = os.wait4(pid, 0)
    except BaseException:
        outcome.interrupted = True
        stop(pid)
        os.waitpid(pid, 0)
        raise
    finally:
        outcome.wall = time.monotonic() - start
        outcome.records = list(chan.records())
        chan.close()
    for record in outcome.records:
        if record["kind"] == "exit":
            outcome.status = record["status"]
        elif record["kind"] == "setup-error" and outcome.setup_error is None:
            outcome.setup_error = SetupFailure(record["step"], record.get("errno"), record["message"])
    return outcome
