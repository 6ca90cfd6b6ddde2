"""What it costs a forked process to join a cgroup, the way a sandbox's payload does, per method.

    sudo python benchmarks/cgroup_join.py [--runs 40] [--gap 0.02]

Three ways, side by side, each with ``--gap`` seconds between joins (tests are milliseconds apart,
not back to back):

* ``moved``: the parent writes the child's pid into ``cgroup.procs``;
* ``self-procs``: the child writes ``0`` into ``cgroup.procs``;
* ``self-tasks``: the child writes ``0`` into ``tasks`` (cgroup v1 only): moving just the calling
  thread, the kernel skips the global ``cgroup_threadgroup_rwsem``, whose write side first waits
  for an RCU grace period.

Uses a scratch cgroup under this process's own memory cgroup (v1) or own cgroup (v2); needs root.
Prints the median and the worst time of one join in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def own_dir() -> tuple[str, bool]:
    """This process's memory cgroup directory (v1) or cgroup (v2), and whether it is v1."""
    lines = open("/proc/self/cgroup").read().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return "/sys/fs/cgroup/memory" + path, True
    path = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
    return "/sys/fs/cgroup" + path, False


def _join(target: str, name: str, who: bytes) -> float:
    start = time.perf_counter()
    fd = os.open(os.path.join(target, name), os.O_WRONLY)
    os.write(fd, who)
    os.close(fd)
    return time.perf_counter() - start


def join_once(target: str, method: str) -> float:
    """Fork a child, join it to ``target`` by ``method``; seconds the join took."""
    gate_r, gate_w = os.pipe()  # parent -> child: "you have been moved"
    back_r, back_w = os.pipe()  # child -> parent: how long its own join took
    pid = os.fork()
    if pid == 0:
        took = 0.0
        if method == "moved":
            os.read(gate_r, 1)
        else:
            took = _join(target, "tasks" if method == "self-tasks" else "cgroup.procs", b"0")
        os.write(back_w, repr(took).encode())
        os._exit(0)
    took = 0.0
    if method == "moved":
        took = _join(target, "cgroup.procs", str(pid).encode())
        os.write(gate_w, b"g")
    os.waitpid(pid, 0)
    took = took or float(os.read(back_r, 64))
    for fd in (gate_r, gate_w, back_r, back_w):
        os.close(fd)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between joins (default 0.02)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: it makes a scratch cgroup and moves processes into it")
    parent, v1 = own_dir()
    target = os.path.join(parent, f"cgroup-join-bench-{os.getpid()}")
    os.mkdir(target)
    methods = ["moved", "self-procs"] + (["self-tasks"] if v1 else [])
    times: dict[str, list[float]] = {m: [] for m in methods}
    try:
        for _ in range(args.runs):
            for method in methods:  # interleaved: every method sees the same machine
                times[method].append(join_once(target, method))
                time.sleep(args.gap)
    finally:
        os.rmdir(target)
    print(f"cgroup {'v1' if v1 else 'v2'}, kernel {os.uname().release}, {args.runs} joins each, {args.gap * 1000:.0f} ms apart")
    for method in methods:
        print(f"{method:11s} median {statistics.median(times[method]) * 1000:7.3f} ms   worst {max(times[method]) * 1000:7.3f} ms")


if __name__ == "__main__":
    main()
