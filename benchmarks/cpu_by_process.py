"""CPU time per test, split by process role, for ``--isolate`` and for pytest-forked (needs root and perf).

    python benchmarks/cpu_by_process.py [--tests 300] [--venv DIR] [--user NAME] [--nocg]

Wall time says how long a test takes; on a machine with few cores what decides it is often how
much CPU every process involved burns, on any core. This runs the generated suite of trivial tests
under ``perf record -a -g`` (every CPU, kernel included) once per mode, then charges each sample to
a role: the pytest process (supervisor), the test processes it forks, the sandboxes' inits (the
processes whose samples show namespace or mount work), the factory, kernel threads (``cleanup_net``
tears network namespaces down in a kworker), idle. For each role: milliseconds of CPU per test and
the kernel or interpreter frames that account for most of it (``copy_process``: fork; ``do_wp_page``:
copy-on-write faults; ``exit_mmap``: an exiting process's memory torn down).

Uses the virtualenv of ``overhead.py`` (pytest 8.4, pytest-forked, this project). ``--user``
runs pytest as that (unprivileged) user — rootless mode — with a virtualenv it can read (``--venv``);
``--nocg`` adds ``--isolate --isolate-cgroups=off``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from overhead import PROJECT, ensure_venv, make_suite, precompile  # noqa: E402

MODES = {"isolated": ["--isolate"], "forked": ["-p", "no:isolate", "--forked"]}
INIT_FRAMES = ("copy_net_ns", "path_mount", "do_mount", "pivot_root", "copy_mnt_ns", "__x64_sys_unshare")
KEY_FRAMES = ("copy_process", "exit_mmap", "do_wp_page", "do_anonymous_page", "__x64_sys_setns", "__x64_sys_unshare",
              "path_mount", "pivot_root", "umount", "do_exit", "gc_collect_main", "copy_net_ns", "cleanup_net",
              "exc_page_fault", "_PyEval_EvalFrameDefault")

Sample = tuple[int, str, float, list[str]]


def record(python: str, directory: str, args: list[str], out: str, user: str = "", events: Sequence[str] = ()) -> None:
    """Run the suite in ``directory`` under ``perf record -a -g`` (with ``events``: ``-e`` each)."""
    runas = ["runuser", "-u", user, "--"] if user else []
    chosen = [arg for event in events for arg in ("-e", event)]
    cmd = ["perf", "record", "-q", "-a", *chosen, "-g", "-o", out, "--", *runas, python, "-m", "pytest", "-q", "-p",
           "no:cacheprovider", "-p", "no:xdist", *args]
    proc = subprocess.run(cmd, cwd=directory, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def samples(data: str) -> list[Sample]:
    text = subprocess.run(["perf", "script", "-i", data, "-F", "pid,comm,time,ip,sym"], capture_output=True,
                          text=True, check=True).stdout
    found: list[Sample] = []
    current: Sample | None = None
    for line in text.split("\n"):
        if not line.strip():
            if current is not None:
                found.append(current)
            current = None
        elif not line[0].isspace():
            parts = line.split()
            current = (int(parts[-2]), " ".join(parts[:-2]), float(parts[-1].rstrip(":")), [])
        elif current is not None:
            current[3].append(line.strip().split(None, 1)[-1])
    if current is not None:
        found.append(current)
    return found


def roles(found: list[Sample]) -> dict[int, str]:
    by_pid: dict[int, list[Sample]] = collections.defaultdict(list)
    for s in found:
        by_pid[s[0]].append(s)
    # the first process that ends up as Python (before its exec perf names it perf-exec; with
    # --user, perf-exec is runuser, which then forks the pytest process)
    supervisor = next(s[0] for s in found if by_pid[s[0]][-1][1].startswith("python"))
    named: dict[int, str] = {}
    for pid, mine in by_pid.items():
        comm = mine[-1][1]
        if pid == 0:
            named[pid] = "idle"
        elif pid == supervisor:
            named[pid] = "pytest process"
        elif comm == "isolate-relay":  # rootless: the fork of pytest that joins the sandbox and forks PID 2
            named[pid] = "relays"
        elif comm in ("pytest_isolate", "isolate-holder") or comm.isdigit():
            named[pid] = "sandbox inits"  # tinyinit, the native holder (named by themselves; before that, their memfd's fd)
        elif not comm.startswith("python"):
            named[pid] = "kernel " + comm.split("/")[0].split("-")[0]
        elif len(mine) > 200:
            named[pid] = "factory"
        elif any(f.startswith(INIT_FRAMES) for s in mine for f in s[3]):
            named[pid] = "sandbox inits"
        else:
            named[pid] = "test processes"
    return named


def report(mode: str, found: list[Sample], tests: int) -> None:
    seconds = found[-1][2] - found[0][2]
    per_ms = len(found) / (seconds * (os.cpu_count() or 1)) / 1000  # samples per CPU-millisecond
    named = roles(found)
    totals: collections.Counter[str] = collections.Counter()
    frames: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pid, _, _, chain in found:
        role = named[pid]
        totals[role] += 1
        key = next((k for frame in chain for k in KEY_FRAMES if k in frame), chain[0] if chain else "?")
        frames[role][key] += 1
    print(f"== {mode}: {tests} tests, {seconds:.2f} s, CPU per test by role (ms; start-up included)")
    for role, count in totals.most_common():
        print(f"{role:<22}{count / per_ms / tests:>7.2f}")
        for key, n in frames[role].most_common(6):
            if n / per_ms / tests >= 0.05:
                print(f"    {key[:56]:<56}{n / per_ms / tests:>7.2f}")


def perf_main(doc: str, events: Sequence[str], analyse: Callable[[str, str, int], None]) -> int:
    """The command line of this script and of preemption.py: record the suite once per mode with
    ``events`` (none: CPU samples) and ``analyse(mode, perf data file, tests)`` each recording."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--venv", default=os.path.join(PROJECT, ".bench-venv"))
    parser.add_argument("--user", default="", help="run pytest as this user (rootless)")
    parser.add_argument("--nocg", action="store_true", help="also --isolate --isolate-cgroups=off")
    args = parser.parse_args()
    if os.getuid() != 0 or not shutil.which("perf"):
        raise SystemExit("needs root and perf (Debian: apt-get install linux-perf)")
    python = ensure_venv(args.venv)
    precompile(python, PROJECT)
    modes = dict(MODES)
    if args.nocg:
        modes = {"isolated": MODES["isolated"], "isolated-nocg": ["--isolate", "--isolate-cgroups=off"],
                 "forked": MODES["forked"]}
    with tempfile.TemporaryDirectory(prefix="isolate-perf-") as directory:
        make_suite(directory, args.tests)
        if args.user:
            shutil.chown(directory, args.user)
        for mode, extra in modes.items():
            data = os.path.join(directory, f"{mode}.data")
            record(python, directory, extra, data, args.user, events)
            analyse(mode, data, args.tests)
    return 0


def main() -> int:
    return perf_main(__doc__, (), lambda mode, data, tests: report(mode, samples(data), tests))


if __name__ == "__main__":
    sys.exit(main())
