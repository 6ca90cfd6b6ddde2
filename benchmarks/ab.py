"""Compare versions of this project against each other, in alternating rounds, each against pytest-forked.

    python benchmarks/ab.py [--tests 300] [--rounds 10] [--nocg] [--venv DIR] [--user NAME] REV [REV ...]

This machine's speed drifts by a third from one minute to the next, so two versions measured one
after the other can't be compared. Here every round runs pytest-forked and then each version (a git
revision, exported with ``git archive`` and put first on ``PYTHONPATH``) on the same generated suite
of trivial tests, so each version meets the same minute. For each run: the median interval between
test starts (the steady state, as in ``overhead.py``), that interval divided by pytest-forked's in the
same round, the CPU time of the whole process tree (pytest, its test processes, the factory and
everything it reaped) per test, and the pytest process's own page faults per test (after a fork
its first write to each page faults, and copies the page while a test process still shares it).
Each round also runs plain pytest, for the overhead including start-up and shutdown: (wall time
of the run - plain pytest's) / (pytest-forked's - plain pytest's), in the same round.
At the end: medians over the rounds, and for each version after the
first the median of its interval (and of its overhead) divided by the first's *in the same
round*, with the number of rounds in which it was faster. ``--nocg`` adds each version again with ``--isolate-cgroups=off``.
Uses the virtualenv of ``overhead.py`` (pytest 8.4, pytest-forked). ``--user`` (from root) runs
every pytest as that unprivileged user, rootless; give it a virtualenv that user can read.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from overhead import PROJECT, ensure_venv, make_suite, precompile, run_once  # noqa: E402

# median interval between test starts (ms), CPU of the process tree per test (ms), the pytest
# process's own page faults per test (every first write to a page after a fork is one), and the
# wall time of the whole run per test (ms)
Run = tuple[float, float, float, float]


def export(rev: str, into: str, python: str = "") -> str:
    """The package as of ``rev``, in a directory of its own (to put on PYTHONPATH), byte-compiled
    by ``python`` when given (see overhead.precompile)."""
    target = os.path.join(into, rev.replace("/", "_"))
    os.makedirs(target)
    archive = subprocess.run(["git", "-C", PROJECT, "archive", rev, "pytest_isolate"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    if python:
        precompile(python, target)
    return target


def run(python: str, suite: str, args: list[str], pythonpath: str, tests: int, user: str = "") -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, interval = run_once(python, suite, ["-p", "no:randomly", *args], {"PYTHONPATH": pythonpath}, user)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / tests * 1e3
    with open(os.path.join(suite, "stamps.txt.self")) as f:
        faults = int(f.read().split()[0]) / tests
    return interval * 1e3, cpu, faults, wall / tests * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", metavar="REV")
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nocg", action="store_true", help="also run each version with --isolate-cgroups=off")
    parser.add_argument("--venv", default=os.path.join(PROJECT, ".bench-venv"))
    parser.add_argument("--user", default="", help="run pytest as this user (rootless; needs root)")
    opts = parser.parse_args()
    python = ensure_venv(opts.venv)
    work = tempfile.mkdtemp(prefix="isolate-ab-")
    try:
        suite = os.path.join(work, "suite")
        os.mkdir(suite)
        make_suite(suite, opts.tests)
        if opts.user:  # the exported code readable, the suite (stamps) writable by that user
            os.chmod(work, 0o755)
            shutil.chown(suite, opts.user)
        variants: dict[str, tuple[str, list[str]]] = {}
        for rev in opts.revs:
            path = export(rev, work, python)
            variants[rev] = (path, ["--isolate"])
            if opts.nocg:
                variants[f"{rev} nocg"] = (path, ["--isolate", "--isolate-cgroups=off"])
        results: dict[str, list[Run]] = {name: [] for name in ["plain", "forked", *variants]}
        overheads: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(opts.rounds):
            plain = run(python, suite, ["-p", "no:isolate"], "", opts.tests, opts.user)
            forked = run(python, suite, ["-p", "no:isolate", "--forked"], "", opts.tests, opts.user)
            results["plain"].append(plain)
            results["forked"].append(forked)
            line = [f"forked {forked[0]:.2f}"]
            for name, (path, args) in variants.items():
                got = run(python, suite, args, path, opts.tests, opts.user)
                results[name].append(got)
                overheads[name].append((got[3] - plain[3]) / (forked[3] - plain[3]))
                line.append(f"{name} {got[0]:.2f} ({got[0] / forked[0]:.3f}, overhead {overheads[name][-1]:.3f}, "
                            f"cpu {got[1]:.1f}, faults {got[2]:.0f})")
            print(f"round {r + 1}: " + "  ".join(line), flush=True)
        print(f"\n{opts.tests} tests, {opts.rounds} rounds, medians: interval ms (ratio to pytest-forked's "
              "in the same round), overhead over plain pytest including start-up (ratio to pytest-forked's), "
              "CPU ms per test, the pytest process's page faults per test")
        results_plain = results.pop("plain")
        forked_runs = results.pop("forked")
        print(f"{'pytest-forked':<24}{statistics.median(r[0] for r in forked_runs):7.2f} (1.000)  (1.000)  "
              f"{statistics.median(r[1] for r in forked_runs):5.1f}  {statistics.median(r[2] for r in forked_runs):5.0f}")
        for name, runs in results.items():
            ratio = statistics.median(r[0] / f[0] for r, f in zip(runs, forked_runs))
            print(f"{name:<24}{statistics.median(r[0] for r in runs):7.2f} ({ratio:.3f})  "
                  f"({statistics.median(overheads[name]):.3f})  "
                  f"{statistics.median(r[1] for r in runs):5.1f}  {statistics.median(r[2] for r in runs):5.0f}")
        first, *others = results
        for name in others:
            paired = [a[0] / b[0] for a, b in zip(results[name], results[first])]
            faster = sum(p < 1 for p in paired)
            walls = [(a[3] - p[3]) / (b[3] - p[3]) for a, b, p in zip(results[name], results[first], results_plain)]
            print(f"{name} / {first}: interval {statistics.median(paired):.3f} in the same round, "
                  f"shorter in {faster} of {len(paired)} rounds; overhead {statistics.median(walls):.3f}, "
                  f"less in {sum(w < 1 for w in walls)} of {len(walls)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
