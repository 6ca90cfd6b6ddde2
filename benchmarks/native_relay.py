"""An experiment for rootless sandboxes: the relay as a clone(CLONE_VM) child instead of a fork.

    python benchmarks/native_relay.py [--runs 40] [--ballast-mb 30]     (rootless; x86_64)

Rootless, ``--isolate`` forks the pytest process twice per test: a relay that joins the sandbox's
user and PID namespaces, and the relay's child, the test process (see engine/launch.py). This
script times that against a relay that shares the caller's memory (``native_relay_x86_64.S``,
assembled here with ``as`` and ``objcopy``): the test process is then the only copy made. Both
start a child in a fresh user+PID+mount namespace whose init waits, the child exits at once, and
each launch ends when its exit status is known; the two ways alternate, each launch with a fresh
sandbox. ``--ballast-mb`` grows this process to about the size of a pytest process first (the
cost of a fork grows with it). Printed: median wall time and CPU (this process and its children)
per launch, for each way, and their ratio.

It first checks that each way's child is PID 2 of the sandbox and that its exit status comes
back, also with glibc's ``fork`` as the native relay's fork function instead of ``_Fork``. The
relay's stack must be a private mapping: ``mmap.mmap(-1, n)`` is MAP_SHARED, which a fork does not
copy, so the relay and its child would run on the same stack memory; glibc's ``fork``, whose
frame outlives the clone, then returned 1 in the child (the relay's writes showed through), while
``_Fork``, a leaf function, happened to work.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import platform
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pytest_isolate.linux import libc  # noqa: E402
from pytest_isolate.linux.userns import write_identity_maps  # noqa: E402

JOIN = libc.CLONE_NEWUSER | libc.CLONE_NEWPID | libc.CLONE_NEWNS
LIBC = ctypes.CDLL(None, use_errno=True)
STACK = 256 * 1024


def assemble() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        obj, raw = os.path.join(tmp, "relay.o"), os.path.join(tmp, "relay.bin")
        subprocess.run(["as", "--64", "-o", obj, os.path.join(HERE, "native_relay_x86_64.S")], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, raw], check=True)
        with open(raw, "rb") as f:
            return f.read()


class Native:
    """The relay's code in an executable page, its stack, and CPython's fork hooks."""

    def __init__(self, fork_name: str) -> None:
        code = assemble()
        self.page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.page))
        LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if LIBC.mprotect(ctypes.c_void_p(address), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
        self.call = ctypes.PYFUNCTYPE(ctypes.c_long, ctypes.c_void_p)(address)  # the GIL stays held
        self.fork = ctypes.cast(getattr(LIBC, fork_name), ctypes.c_void_p).value or 0
        self.stack = mmap.mmap(-1, STACK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.top = ctypes.addressof(ctypes.c_char.from_buffer(self.stack)) + STACK
        self.hooks = [getattr(ctypes.pythonapi, name) for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child")]
        for hook in self.hooks:
            hook.restype, hook.argtypes = None, []

    def launch(self, init: int, code: int) -> int:
        """Start a child in ``init``'s namespaces that exits with ``code`` if it is PID 2 (else 99);
        return its wait status."""
        pidfd = os.pidfd_open(init)
        pairs = (ctypes.c_long * 2)(pidfd, JOIN)
        gate, report = os.pipe()
        args = (ctypes.c_long * 8)(self.fork, 1, ctypes.addressof(pairs), self.top, 0, 0, report, gate)
        self.hooks[0]()
        relay = self.call(ctypes.addressof(args))
        if relay == 0:
            self.hooks[2]()
            child(code)
        self.hooks[1]()
        os.close(report)
        os.close(pidfd)
        try:
            if relay < 0 or args[5] < 0:
                raise OSError(-min(relay, args[5]), "native relay")
            data = os.read(gate, 148)
            os.waitpid(relay, 0)
        finally:
            os.close(gate)
        return int(struct.unpack("i", data[:4])[0]) if len(data) >= 4 else -1


SEEN = [-1]  # write end of a pipe where a launched child says it runs (in the checks)


def child(code: int) -> None:
    """The launched child: say so (in the checks), exit ``code`` if it is PID 2, else 99."""
    if SEEN[0] >= 0:
        os.write(SEEN[0], b"k")
    os._exit(code if os.getpid() == 2 else 99)


def forked_relay(init: int, code: int) -> int:
    """What launch.py does rootless: fork a relay, which joins and forks the child and reports."""
    pidfd = os.pidfd_open(init)
    gate, report = os.pipe()
    relay = os.fork()
    if relay == 0:
        try:
            libc.setns(pidfd, JOIN)
            pid = os.fork()
            if pid == 0:
                child(code)
            os.write(report, struct.pack("i", os.waitpid(pid, 0)[1]))
        finally:
            os._exit(0)
    os.close(report)
    os.close(pidfd)
    data = os.read(gate, 4)
    os.waitpid(relay, 0)
    os.close(gate)
    return int(struct.unpack("i", data)[0]) if len(data) == 4 else -1


def sandbox() -> int:
    """A fresh user+PID+mount namespace whose init (PID 1) waits for SIGKILL; returns its pid."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            uid, gid = os.getuid(), os.getgid()
            libc.unshare(JOIN)
            write_identity_maps(uid, gid)
            init = os.fork()
            if init == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_IGN)
                while True:
                    signal.pause()
            os.write(write, struct.pack("i", init))
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    data = os.read(read, 4)
    os.close(read)
    if len(data) != 4:
        raise SystemExit("cannot make a user+PID namespace here (user namespaces disabled?)")
    return int(struct.unpack("i", data)[0])


def describe(status: int) -> str:
    if status == -1:
        return "no status came back (the relay's wait for its child failed)"
    if os.WIFEXITED(status):
        return {7: "exited 7 as PID 2 (right)", 99: "exited, but not as PID 2"}.get(os.WEXITSTATUS(status), f"exited {os.WEXITSTATUS(status)}")
    return f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {status}"


def cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--ballast-mb", type=int, default=30)
    args = parser.parse_args()
    if platform.machine() != "x86_64":
        raise SystemExit("the native relay is x86_64 only")
    ballast = [str(i) * 4 for i in range(args.ballast_mb * 14000)]  # ~70 bytes each
    native = Native("_Fork")
    ways = {"forked relay (as launch.py)": forked_relay, "native relay (_Fork)": native.launch}
    checks = dict(ways, **{"native relay (glibc fork)": Native("fork").launch})
    for name, launch in checks.items():
        init = sandbox()
        seen, SEEN[0] = os.pipe()
        try:
            status = launch(init, 7)
            os.close(SEEN[0])
            ran = os.read(seen, 1) == b"k"
            print(f"check  {name:28} {describe(status) if ran else 'its child never ran as a fork of this process'}")
        finally:
            os.close(seen)
            SEEN[0] = -1
            os.kill(init, signal.SIGKILL)
    walls: dict[str, list[float]] = {name: [] for name in ways}
    cpus: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.runs):
        for name, launch in ways.items():
            init = sandbox()
            c0, t0 = cpu(), time.perf_counter()
            status = launch(init, 0)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(cpu() - c0)
            os.kill(init, signal.SIGKILL)
            if status != 0:
                raise SystemExit(f"{name}: {describe(status)}")
    print(f"\n{len(ballast)} strings of ballast (~{args.ballast_mb} MB), {args.runs} launches each, uid {os.getuid()}")
    base = next(iter(ways))
    for name in ways:
        wall, used = statistics.median(walls[name]) * 1e3, statistics.median(cpus[name]) * 1e3
        ratio = statistics.median(walls[name]) / statistics.median(walls[base])
        print(f"{name:28} wall {wall:6.3f} ms  CPU {used:6.3f} ms  wall ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
