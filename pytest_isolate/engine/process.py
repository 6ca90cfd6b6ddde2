"""One program running in its own sandbox: the handle ``Sandbox.popen`` returns.

It mirrors ``subprocess.Popen`` (``wait``, ``poll``, ``communicate``, ``terminate``, ``kill``,
``returncode``, ``stdin``/``stdout``/``stderr``) and adds what a sandbox knows: live ``usage()``
from the cgroup leaf, ``oom_killed`` and ``timed_out``. When the program exits the whole sandbox
ends with it (its init is killed, so no daemon it left behind survives) and the leaf is given back.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from typing import IO, Any, Callable, Optional, Union

from ..linux.cgroups import CgroupError, Leaf
from .accounting import Measurement, from_cgroup
from .factory import Prepared
from .spec import SandboxSpec

PIPE, DEVNULL = subprocess.PIPE, subprocess.DEVNULL
Stream = Union[None, int, IO[Any]]


class ExecFailed(OSError):
    """The program could not be started inside the sandbox (e.g. no such executable there)."""


class TimeoutExpired(subprocess.TimeoutExpired):
    """``wait``/``communicate`` gave up waiting (the program keeps running; see ``timeout=`` for a limit)."""


def _child_end(spec: Stream, for_input: bool, opened: list[int], ours: list[Optional[IO[bytes]]]) -> int:
    """The fd the program gets for one stream; ``ours`` receives our end of a pipe."""
    if spec is None:
        ours.append(None)
        return 0 if for_input else (1 if len(ours) == 2 else 2)
    if spec == DEVNULL:
        fd = os.open(os.devnull, os.O_RDONLY if for_input else os.O_WRONLY)
        opened.append(fd)
        ours.append(None)
        return fd
    if spec == PIPE:
        r, w = os.pipe()
        mine, theirs = (w, r) if for_input else (r, w)
        opened.append(theirs)
        ours.append(os.fdopen(mine, "wb" if for_input else "rb", buffering=0))
        return theirs
    ours.append(None)
    return spec if isinstance(spec, int) else spec.fileno()


def _pid_of(pidfd: int) -> int:
    """The process's PID in our PID namespace (-1 once it has been reaped), from the pidfd's fdinfo."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


class SandboxProcess:
    """A program started in a sandbox of its own (see module doc)."""

    def __init__(self, args: list[str], sandbox: Prepared, leaf: Optional[Leaf], release: Callable[[], None], *,
                 env: dict[str, str], cwd: str, timeout: Optional[float], stdin: Stream, stdout: Stream,
                 stderr: Stream, spec: SandboxSpec) -> None:
        assert sandbox.control is not None
        self.args = args
        self.leaf = leaf
        self._sandbox = sandbox
        self._release: Optional[Callable[[], None]] = release
        self.returncode: Optional[int] = None
        self.timed_out = False
        self.hostname: str = ""
        self.address: Optional[str] = None  # on a Sandbox network: its IPv4 address there
        self.spec = spec  # its options: limits, hostname, ...
        self._final: Optional[Measurement] = None
        self._rusage: dict[str, float] = {}
        self._sampled_peak = 0.0
        opened: list[int] = []
        ours: list[Optional[IO[bytes]]] = []
        control = sandbox.control
        try:
            fds = [_child_end(stdin, True, opened, ours), _child_end(stdout, False, opened, ours),
                   _child_end(stderr, False, opened, ours)]
            self.stdin, self.stdout, self.stderr = ours
            request = {"op": "exec", "argv": args, "env": env, "cwd": cwd, "timeout": timeout}
            self.start = time.monotonic()
            socket.send_fds(control, [json.dumps(request).encode()], fds)
            for fd in opened:
                os.close(fd)
            opened.clear()
            answer, pidfds, _, _ = socket.recv_fds(control, 4096, 1, socket.MSG_CMSG_CLOEXEC)
            reply = json.loads(answer) if answer else {"op": "failed", "errno": 0, "message": "the sandbox's init died"}
            if reply["op"] != "started" or not pidfds:
                raise ExecFailed(reply["errno"], f"cannot start {args[0]!r} in the sandbox: {reply['message']}")
            self.pidfd = pidfds[0]  # signals go through it: never to a reused pid
            self.pid = _pid_of(self.pidfd)
        except BaseException:
            for fd in opened:
                os.close(fd)
            for stream in ours:
                if stream is not None:
                    stream.close()
            self._end()
            raise

    # ------------------------------------------------------------------------------ waiting --

    def _receive(self, timeout: Optional[float]) -> bool:
        """Wait up to ``timeout`` for the init's "exited" message; True once the program ended."""
        if self.returncode is not None:
            return True
        control = self._sandbox.control
        assert control is not None
        if not select.select([control], [], [], timeout)[0]:
            return False
        try:
            data = control.recv(4096)
        except OSError:
            data = b""
        message = json.loads(data) if data else {"status": None}
        self._finish(message)
        return True

    def _finish(self, message: dict[str, Any]) -> None:
        self.wall = time.monotonic() - self.start
        status = message.get("status")
        self.timed_out = bool(message.get("timed_out"))
        if status is None:
            self.returncode = -signal.SIGKILL  # the init died: the sandbox was killed from outside
        elif os.WIFSIGNALED(status):
            self.returncode = -os.WTERMSIG(status)
        else:
            self.returncode = os.WEXITSTATUS(status)
        self._rusage = {k: message[k] for k in ("utime", "stime", "maxrss") if k in message}
        self._final = self._measure()
        self._end()

    def _measure(self) -> Measurement:
        wall = getattr(self, "wall", time.monotonic() - self.start)
        if self.leaf is not None:
            try:
                return from_cgroup(self.leaf.usage(), wall)
            except (OSError, CgroupError):
                pass
        values: dict[str, Optional[float]] = {"wall": wall}
        if self.returncode is None:
            values.update(self._sample())
        elif self._rusage:
            values.update(cpu_user=self._rusage["utime"], cpu_system=self._rusage["stime"],
                          memory_peak=self._rusage["maxrss"] * 1024)
        sources = {name: "estimate" for name in values}
        sources["wall"] = "wall clock"
        return Measurement(dict(values), sources)

    def _sample(self) -> dict[str, Optional[float]]:
        """Without a cgroup, live figures from psutil over the process tree: memory is the largest
        total RSS seen by any sample so far (an estimate of the peak)."""
        import psutil

        try:
            main = psutil.Process(self.pid)
            procs = [main] + main.children(recursive=True)
        except (psutil.Error, ValueError):
            return {}
        rss = user = system = 0.0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    user += times.user + times.children_user
                    system += times.system + times.children_system
            except psutil.Error:
                continue
        self._sampled_peak = max(self._sampled_peak, rss)
        return {"memory_peak": self._sampled_peak, "cpu_user": user, "cpu_system": system, "pids_peak": len(procs)}

    def _end(self) -> None:
        if getattr(self, "pidfd", -1) >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def poll(self) -> Optional[int]:
        self._receive(0)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._receive(timeout):
            raise TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def communicate(self, input: Optional[bytes] = None, timeout: Optional[float] = None) -> tuple[Optional[bytes], Optional[bytes]]:
        """Feed ``input``, read stdout/stderr to the end, wait for the exit (like ``Popen.communicate``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: dict[int, list[bytes]] = {}
        readers = {s.fileno(): s for s in (self.stdout, self.stderr) if s is not None and not s.closed}
        out_fd, err_fd = (s.fileno() if s is not None and not s.closed else -1 for s in (self.stdout, self.stderr))
        for fd in readers:
            chunks[fd] = []
        pending = memoryview(input or b"")
        writer = self.stdin
        if writer is not None and not pending:
            writer.close()
            writer = None
        control = self._sandbox.control
        while readers or writer is not None or self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutExpired(self.args, timeout or 0)
            rlist: list[Any] = list(readers)
            if self.returncode is None and control is not None:
                rlist.append(control)
            wlist = [writer] if writer is not None else []
            readable, writable, _ = select.select(rlist, wlist, [], left)
            if control in readable:
                self._receive(0)  # the sandbox ended: leftover writers are dead, so pipes reach EOF
            for fd in readable:
                if fd is control:
                    continue
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    readers.pop(fd).close()
            if writer is not None and writable:
                try:
                    pending = pending[os.write(writer.fileno(), pending[:65536]):]
                except BrokenPipeError:
                    pending = memoryview(b"")
                if not pending:
                    writer.close()
                    writer = None
            if self.returncode is not None and control is not None:
                control = None
        return (b"".join(chunks[out_fd]) if out_fd in chunks else None,
                b"".join(chunks[err_fd]) if err_fd in chunks else None)

    # ------------------------------------------------------------------------------ signals --

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    # ----------------------------------------------------------------------------- figures --

    @property
    def oom_killed(self) -> bool:
        usage = self.usage()
        return bool(usage.oom_kills)

    def usage(self) -> Measurement:
        """Live figures while it runs (from the cgroup leaf), final ones once it ended."""
        if self._final is not None:
            return self._final
        return self._measure()

    def close(self) -> None:
        """Kill the program and its sandbox if still running; close our pipe ends."""
        if self.returncode is None:
            self.kill()
            self._receive(5.0)
            if self.returncode is None:
                self._finish({"status": None})
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self) -> "SandboxProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SandboxProcess pid={getattr(self, 'pid', None)} args={self.args!r} returncode={self.returncode}>"
