"""Time a rootless test process's start through each relay: forked (a second copy of pytest) and native.

    python benchmarks/native_relay.py [--runs 40] [--ballast-mb 30]     (rootless; x86_64, glibc)

Rootless, the test process must be born in the sandbox's PID namespace, which only a process in
the sandbox's user namespace can point its children into: a relay does it (see engine/launch.py).
The forked relay is a fork of the pytest process that joins the namespaces and forks the test
process; the native one (``pytest_isolate/linux/relay.py``) is forked too but makes the test
process with ``clone(CLONE_VM)``, sharing its memory, so the relay is the only copy made. Both start a child in a fresh user+PID+mount namespace
whose init waits, the child exits at once, and each launch ends when its exit status is known; the
two ways alternate, each launch with a fresh namespace. ``--ballast-mb`` grows this process to
about the size of a pytest process first (the cost of a fork grows with it). Printed: median wall
time and CPU (this process and its children) per launch, for each way, and their ratio. It first
checks that each way's child is PID 2 of the namespace and that its exit status comes back.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import signal
import statistics
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pytest_isolate.linux import libc, relay  # noqa: E402
from pytest_isolate.linux.userns import write_identity_maps  # noqa: E402

JOIN = libc.CLONE_NEWUSER | libc.CLONE_NEWPID | libc.CLONE_NEWNS


def native_launch(init: int, code: int) -> int:
    """What launch.py does rootless with a native relay: the child is forked by the relay."""
    native = relay.native()
    if native is None:
        raise SystemExit(f"no native relay here: {relay.why_not()}")
    pidfd = os.pidfd_open(init)
    try:
        pid, report = native.fork([(pidfd, JOIN)])
        if pid == 0:
            child(code)
    finally:
        os.close(pidfd)
    try:
        status = relay.read_status(report)
    finally:
        os.close(report)
        os.waitpid(pid, 0)
    return -1 if status is None else status


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
    ways = {"forked relay": forked_relay, "native relay": native_launch}
    for name, launch in ways.items():
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
