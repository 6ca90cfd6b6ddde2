"""Start-to-exit time of ``Sandbox.run(["true"])`` beside ``subprocess.run(["true"])`` and
``unshare -Urpfn --mount-proc true``, interleaved in one run so all three see the same noise.

    python benchmarks/sandbox_run.py [--runs 200] [--gap 0.0] [--limits]

Each round times one call of each, in rotating order; the medians and the ratio to unshare are
printed. ``--gap S`` sleeps S seconds between calls (a caller that does other work between runs:
the factory has built the next sandbox by then); the default, 0, is a tight loop, where the
factory's build of the next sandbox competes with the calls. ``--limits`` gives every sandbox a
memory, CPU and pids limit (its cgroup leaf exists either way where cgroups are usable).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pytest_isolate import Sandbox  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.0)
    parser.add_argument("--limits", action="store_true")
    args = parser.parse_args()
    unshare = shutil.which("unshare")
    true = shutil.which("true") or "/bin/true"
    limits = {"memory": "256M", "cpus": 1.0, "pids": 64} if args.limits else {}
    with Sandbox(**limits) as box:
        calls = {
            "sandbox.run": lambda: box.run([true], check=True),
            "subprocess.run": lambda: subprocess.run([true], check=True),
        }
        if unshare:
            calls["unshare -Urpfn"] = lambda: subprocess.run([unshare, "-Urpfn", "--mount-proc", true], check=True)
        for call in calls.values():  # warm up: imports, the factory, the first sandbox
            call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        for i in range(args.runs):
            for name in names[i % len(names):] + names[: i % len(names)]:
                if args.gap:
                    time.sleep(args.gap)
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        cgroup = box.launcher.cgroups()[0] is not None
    print(f"{args.runs} rounds, interleaved, gap {args.gap:g}s, uid {os.getuid()}, kernel {os.uname().release}, "
          f"cgroup leaf per sandbox: {'yes' if cgroup else 'no'}{', limits set' if limits else ''}")
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name:<16}{ms:8.2f} ms median   (p10 {statistics.quantiles(times[name], n=10)[0] * 1000:.2f}, "
              f"p90 {statistics.quantiles(times[name], n=10)[-1] * 1000:.2f})")
    if "unshare -Urpfn" in medians:
        print(f"sandbox.run / unshare = {medians['sandbox.run'] / medians['unshare -Urpfn']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
