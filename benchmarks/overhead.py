"""Per-test overhead of isolation, side by side with plain pytest and pytest-forked, in one run.

    python benchmarks/overhead.py [--tests 300] [--rounds 5] [--venv DIR]

pytest-forked fails on pytest 9 (every test "EXITED with status 3"), so the script builds its own
virtualenv (default ``.bench-venv``) with pytest 8.4, pytest-forked and this project, and runs every
mode with that one interpreter: same pytest, same machine, same minute. Generates a suite of trivial tests, then runs it round-robin (plain, --isolate, --forked, ...) so
that every mode sees the same machine noise, and reports medians: per-test wall time of each mode,
the overhead over plain pytest and the ratio to pytest-forked; ``isolated-nocg`` runs with
``--isolate-cgroups=off``, so the difference to ``isolated`` is what cgroups cost.

It also reports the steady state, which start-up and a noisy second cannot skew: a conftest in the
generated suite stamps every test's start (``pytest_runtest_logstart``, in the pytest process in
every mode), each run yields the median interval between consecutive tests (the first 10 skipped),
and each round's interval of a mode is divided by pytest-forked's in the same round; the table
shows medians over the rounds. Also times the bare kernel work,
``unshare -Urpfn --mount-proc true``, for scale. Needs pytest-forked for the --forked column

"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


STAMPS_CONFTEST = """
import os, time
_STARTS = []

def pytest_runtest_logstart(nodeid, location):
    _STARTS.append(time.perf_counter())

def pytest_sessionfinish(session):
    if "BENCH_STAMPS" not in os.environ:
        return
    with open(os.environ["BENCH_STAMPS"], "w") as f:
        f.write("\\n".join(map(repr, _STARTS)))
    import resource  # the pytest process's own page faults and CPU, for ab.py
    own = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.environ["BENCH_STAMPS"] + ".self", "w") as f:
        f.write(f"{own.ru_minflt} {own.ru_utime + own.ru_stime!r} {len(_STARTS)}")
"""


def make_suite(directory: str, tests: int) -> None:
    body = "\n".join(f"def test_{i}():\n    assert {i} >= 0\n" for i in range(tests))
    with open(os.path.join(directory, "test_generated.py"), "w") as f:
        f.write(body)
    with open(os.path.join(directory, "conftest.py"), "w") as f:
        f.write(STAMPS_CONFTEST)


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"plain": ["-p", "no:isolate"], "isolated": ["--isolate"], "isolated-nocg": ["--isolate", "--isolate-cgroups=off"],
         "forked": ["-p", "no:isolate", "--forked"]}


def ensure_venv(venv: str) -> str:
    """A virtualenv with pytest 8.4 (pytest-forked's last working pytest), pytest-forked and us."""
    python = os.path.join(os.path.abspath(venv), "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [python, "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "pytest>=8.4,<9", "pytest-forked", "-e", PROJECT], check=True)
    return python


def precompile(python: str, tree: str) -> None:
    """Byte-compile the package under ``tree`` with ``python``, as ``pip install`` does: an editable
    or exported copy has no .pyc files, and where nothing writes them (PYTHONDONTWRITEBYTECODE, a
    user who cannot write the tree, the factory's ``-I``) every run would compile ~30 modules from
    source, tens of milliseconds of start-up that an installed package never pays."""
    package = os.path.join(tree, "pytest_isolate")
    done = subprocess.run([python, "-m", "compileall", "-q", package], check=False, stdout=subprocess.DEVNULL)
    if done.returncode:
        print(f"note: could not byte-compile {package} (not writable by this user?): each run's start-up "
              "includes compiling it; byte-compile it once as its owner", file=sys.stderr)


def run_once(python: str, directory: str, args: list[str], env: dict[str, str] | None = None,
             user: str = "") -> tuple[float, float]:
    """Wall time of the whole run, and the median interval between test starts (the steady state);
    ``env``: variables to add (e.g. PYTHONPATH, see ab.py); ``user``: run pytest as that user
    (``runuser``, from root), rootless."""
    runas = ["runuser", "-u", user, "--"] if user else []
    cmd = [*runas, python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *args]
    stamps = os.path.join(directory, "stamps.txt")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=directory, capture_output=True, text=True, check=False,
                          env=dict(os.environ, BENCH_STAMPS=stamps, **(env or {})))
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    with open(stamps) as f:
        starts = [float(line) for line in f if line.strip()][10:]
    return elapsed, statistics.median(b - a for a, b in zip(starts, starts[1:]))


def kernel_baseline(rounds: int) -> float:
    if not shutil.which("unshare"):
        return float("nan")
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(["unshare", "-Urpfn", "--mount-proc", "true"], check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--venv", default=os.path.join(PROJECT, ".bench-venv"))
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    precompile(python, PROJECT)
    results: dict[str, list[float]] = {name: [] for name in MODES}
    intervals: dict[str, list[float]] = {name: [] for name in MODES}
    with tempfile.TemporaryDirectory(prefix="isolate-bench-") as directory:
        make_suite(directory, args.tests)
        for _ in range(args.rounds):
            for name, extra in MODES.items():
                elapsed, interval = run_once(python, directory, extra)
                results[name].append(elapsed)
                intervals[name].append(interval)
    unshare = kernel_baseline(max(args.rounds * 10, 20))
    plain = statistics.median(results["plain"])
    per_test = {name: statistics.median(times) / args.tests for name, times in results.items()}
    version = subprocess.run([python, "-c", "import sys, pytest; print(sys.version.split()[0], pytest.__version__)"],
                             capture_output=True, text=True, check=True).stdout.split()
    print(f"{args.tests} trivial tests, {args.rounds} rounds round-robin, medians; "
          f"python {version[0]}, pytest {version[1]}, kernel {os.uname().release}, uid {os.getuid()}")
    print(f"{'mode':<10}{'run (s)':>10}{'per test (ms)':>16}{'overhead/test (ms)':>21}")
    for name, times in results.items():
        overhead = (statistics.median(times) - plain) / args.tests * 1000
        print(f"{name:<10}{statistics.median(times):>10.2f}{per_test[name] * 1000:>16.2f}{overhead:>21.2f}")
    iso = statistics.median(results["isolated"]) - plain
    fork = statistics.median(results["forked"]) - plain
    print(f"isolated overhead / forked overhead = {iso / fork:.2f}")
    cgroups = (statistics.median(results["isolated"]) - statistics.median(results["isolated-nocg"])) / args.tests * 1000
    print(f"cgroups' share (isolated - isolated-nocg): {cgroups:.2f} ms per test")
    print(f"unshare -Urpfn --mount-proc true (process start included): {unshare * 1000:.2f} ms")
    print("steady state: median interval between test starts (ms), and its ratio to pytest-forked's in the same round")
    for name, values in intervals.items():
        ratios = [v / f for v, f in zip(values, intervals["forked"])]
        print(f"{name:<14}{statistics.median(values) * 1000:>8.2f}{statistics.median(ratios):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
