"""Time ``build_root`` alone (the copy-on-write root of one sandbox) for this host's plan, for code
versions side by side.

    python benchmarks/build_root.py [--builds 60] [--pairs 5] [--user NAME] [--python PATH] [REV ...]

Each build runs in a fresh fork that unshares a mount namespace (rootless, ``--user`` from root or
run as an unprivileged user: a user namespace too, with the identity maps) and builds the root of
a default ``isolated`` test, as the factory, or rootless its holders, do for every test; the
median of ``--builds`` builds is one run. Without REV it times the working tree; with REVs (git
revisions, exported with ``git archive``) it alternates them, ``--pairs`` times, so that each meets
the same minute of this machine's drifting speed, and prints the medians and each one's ratio to
the first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ab import PROJECT, export  # noqa: E402

CHILD = r"""
import os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from pytest_isolate.engine.host import current_host
from pytest_isolate.engine.spec import SandboxSpec
from pytest_isolate.linux import libc
from pytest_isolate.linux.rootfs import build_root
from pytest_isolate.linux.userns import write_identity_maps

opts = current_host().plan(SandboxSpec(), cwd="/", writable=(sys.argv[3],)).root
uid, gid = os.getuid(), os.getgid()
times = []
for _ in range(int(sys.argv[2])):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        libc.unshare(libc.CLONE_NEWNS | (libc.CLONE_NEWUSER if uid else 0))
        if uid:
            write_identity_maps(uid, gid)
        start = time.perf_counter()
        build_root(opts, mount_proc=False)
        os.write(write, repr(time.perf_counter() - start).encode())
        os._exit(0)
    os.close(write)
    took = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    times.append(float(took))
overlays = sum(1 for s in opts.steps if s.action == "overlay")
print(statistics.median(times) * 1e3, overlays)
"""


def run(python: str, source: str, builds: int, scratch: str, user: str) -> tuple[float, int]:
    runas = ["runuser", "-u", user, "--"] if user else []
    cmd = [*runas, python, "-I", "-c", CHILD, source, str(builds), scratch]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"a build failed:\n{out.stderr[-2000:]}")
    median, overlays = out.stdout.split()
    return float(median), int(overlays)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", metavar="REV")
    parser.add_argument("--builds", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--user", default="", help="build as this user (rootless; needs root)")
    parser.add_argument("--python", default="", help="the interpreter (default: this one; with --user /usr/bin/python3, "
                        "which that user can run)")
    opts = parser.parse_args()
    python = opts.python or ("/usr/bin/python3" if opts.user else sys.executable)
    work = tempfile.mkdtemp(prefix="isolate-build-root-")
    try:
        os.chmod(work, 0o755)
        scratch = os.path.join(work, "writable")
        os.mkdir(scratch)
        if opts.user:
            shutil.chown(scratch, opts.user)
        sources = {rev: export(rev, work, python) for rev in opts.revs} or {"working tree": PROJECT}
        results: dict[str, list[float]] = {name: [] for name in sources}
        overlays = 0
        for _ in range(opts.pairs):
            for name, source in sources.items():
                median, overlays = run(python, source, opts.builds, scratch, opts.user)
                results[name].append(median)
            print("  ".join(f"{name} {runs[-1]:.2f} ms" for name, runs in results.items()), flush=True)
        first = next(iter(results.values()))
        print(f"\nbuild_root, {overlays} overlays, median of {opts.builds} builds per run, medians over {opts.pairs} runs:")
        for name, runs in results.items():
            ratio = statistics.median(a / b for a, b in zip(runs, first))
            print(f"{name:<24}{statistics.median(runs):7.2f} ms  ({ratio:.3f} of the first, same pair)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
