"""The init's side of the Sandbox API: start one program as PID 2 on request, report how it ended.

Why the init and not the supervisor: the init is already inside every namespace, and the factory
has put it into the sandbox's cgroup leaf ahead of time, so the program is *born* in the leaf (no
cgroup migration on the critical path) and started with ``posix_spawn`` (vfork: no page-table copy,
exec errors such as ENOENT reported synchronously). The init's own usage counts in the leaf; it
is a sleeping reaper, and the docs say its one process counts toward ``pids``.

Control messages (SOCK_SEQPACKET, one JSON object each):
  supervisor -> init  {"op": "exec", "argv", "env", "cwd", "timeout"} + fds [stdin, stdout, stderr]
  init -> supervisor  {"op": "started"} + [pidfd of the program] or {"op": "failed", "errno", "message"}, later
                      {"op": "exited", "status", "timed_out", "utime", "stime", "maxrss"}
The init enforces ``timeout`` itself (kills every process of the PID namespace), so a deadline holds
even while nobody in the supervisor is waiting.
"""

from __future__ import annotations

# Imported now, not on first use: after pivot_root into an image there may be no Python library to
# import from. (socket.send_fds/recv_fds import array; os.wait4 needs resource.)
import array  # noqa: F401
import json
import os
import resource  # noqa: F401
import select
import signal
import socket
import time
TYPE_CHECKING = False  # typing costs the factory 1.1 MB of heap: see linux/record.py
if TYPE_CHECKING:
    from typing import Any, NoReturn, Optional

RESET = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ)
MAX_REQUEST = 1 << 20


def _spawn(request: dict[str, Any], fds: list[int]) -> int:
    """Start the program as our child (PID 2): its stdio, its own session, default signals."""
    os.chdir(request["cwd"])  # posix_spawn has no chdir action; the init's cwd does not matter
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
    return os.posix_spawnp(request["argv"][0], request["argv"], request["env"], file_actions=actions,
                           setsid=True, setsigmask=(), setsigdef=RESET)


def _reply(ctl: socket.socket, **fields: Any) -> None:
    try:
        ctl.send(json.dumps(fields).encode())
    except OSError:
        os._exit(0)  # nobody listens any more: end the sandbox


def serve_control(ctl: socket.socket) -> NoReturn:
    """PID 1's loop: reap everything, start the program it is asked for, report its end."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    job = 0
    deadline: Optional[float] = None
    timed_out = False
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        watched: list[Any] = [ctl, wake_r]
        ready = select.select(watched, [], [], wait)[0]
        if deadline is not None and job and time.monotonic() >= deadline and not timed_out:
            timed_out = True
            os.kill(-1, signal.SIGKILL)  # as PID 1: every other process of the namespace
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            if pid == job:
                _reply(ctl, op="exited", status=status, timed_out=timed_out, utime=usage.ru_utime,
                       stime=usage.ru_stime, maxrss=usage.ru_maxrss)
                job, deadline = 0, None
        if ctl in ready:
            try:
                data, fds, _, _ = socket.recv_fds(ctl, MAX_REQUEST, 8, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                os._exit(0)
            if not data:
                os._exit(0)  # the supervisor is gone: ending the init ends the sandbox
            request = json.loads(data)
            if request.get("op") == "exec" and not job and len(fds) == 3:
                try:
                    job = _spawn(request, fds)
                except OSError as exc:
                    _reply(ctl, op="failed", errno=exc.errno, message=exc.strerror or str(exc))
                else:
                    pidfd = os.pidfd_open(job)  # not yet reaped, so valid even if it already exited
                    try:
                        socket.send_fds(ctl, [json.dumps({"op": "started"}).encode()], [pidfd])
                    except OSError:
                        os._exit(0)
                    os.close(pidfd)
                    if request.get("timeout") is not None:
                        deadline = time.monotonic() + float(request["timeout"])
            for fd in fds:
                os.close(fd)
