"""What a session's start and end cost, phase by phase: plain pytest, pytest-forked and versions of
this project, side by side in alternating rounds.

    python benchmarks/startup.py [--rounds 25] [--tests 1] [--venv DIR] [--user NAME] [REV ...]

``overhead.py`` spreads a session's fixed cost over its tests; this measures it alone, on a suite
of one trivial test (``--tests``: more, so that the last ones overlap as in a real run). A conftest stamps CLOCK_MONOTONIC at its import, at pytest_sessionstart,
at the first test's logstart and the last one's logfinish, at pytest_unconfigure and in an atexit handler; the script
stamps the process's start and end. Printed: the median of each phase in each mode (ms) and of
the whole run, and each mode's run minus plain pytest's. Phases, each from the stamp before:

    conftest       the interpreter's and pytest's start, plugins imported (the conftest is loaded)
    sessionstart   the rest of the configuration, pytest_sessionstart's hooks
    logstart       collection, the header
    logfinish      the tests: the first one's sandbox (the factory must be up), fork, protocol
    unconfigure    the session's end: summary, sessionfinish
    atexit         the unconfigure hooks (the factory's end), pytest's return
    end            the interpreter's teardown, the process's exit

Each REV is a git revision of this project, exported and put first on PYTHONPATH as ``ab.py``
does, and run with ``--isolate``; without REVs the working tree is (``--isolate`` as installed in
the virtualenv). ``-q``, as ``overhead.py``: pytest prints no header, so nothing asks for the probe
before the first test. Uses ``overhead.py``'s virtualenv; ``--user`` as in ``ab.py``.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ab import export  # noqa: E402
from overhead import PROJECT, ensure_venv, precompile  # noqa: E402

STAMPS_CONFTEST = """
import atexit, os, time

def _now():
    return time.clock_gettime(time.CLOCK_MONOTONIC)

_STAMPS = [("conftest", _now())]

def pytest_sessionstart(session):
    _STAMPS.append(("sessionstart", _now()))

def pytest_runtest_logstart(nodeid):
    if not any(name == "logstart" for name, _ in _STAMPS):
        _STAMPS.append(("logstart", _now()))

def pytest_runtest_logfinish(nodeid):
    _STAMPS[:] = [stamp for stamp in _STAMPS if stamp[0] != "logfinish"] + [("logfinish", _now())]

def pytest_unconfigure(config):
    _STAMPS.append(("unconfigure", _now()))

@atexit.register
def _write():
    _STAMPS.append(("atexit", _now()))
    with open(os.environ["BENCH_STAMPS"], "w") as f:
        f.write("\\n".join(f"{name} {t!r}" for name, t in _STAMPS))
"""
PHASES = ("conftest", "sessionstart", "logstart", "logfinish", "unconfigure", "atexit", "end")


def run_once(python: str, suite: str, args: list[str], pythonpath: str, user: str) -> dict[str, float]:
    """One run of the one-test suite: each phase's length (ms) and the whole run's."""
    runas = ["runuser", "-u", user, "--"] if user else []
    stamps = os.path.join(suite, "stamps.txt")
    env = dict(os.environ, BENCH_STAMPS=stamps, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    cmd = [*runas, python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly", *args]
    start = time.clock_gettime(time.CLOCK_MONOTONIC)
    proc = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, check=False)
    end = time.clock_gettime(time.CLOCK_MONOTONIC)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    with open(stamps) as f:
        points = dict((name, float(t)) for name, t in (line.split() for line in f if line.strip()))
    points["end"] = end
    phases, before = {}, start
    for name in PHASES:
        phases[name] = (points[name] - before) * 1e3
        before = points[name]
    phases["total"] = (end - start) * 1e3
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", metavar="REV")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--tests", type=int, default=1)
    parser.add_argument("--venv", default=os.path.join(PROJECT, ".bench-venv"))
    parser.add_argument("--user", default="", help="run pytest as this user (rootless; needs root)")
    opts = parser.parse_args()
    python = ensure_venv(opts.venv)
    work = tempfile.mkdtemp(prefix="isolate-startup-")
    try:
        suite = os.path.join(work, "suite")
        os.mkdir(suite)
        with open(os.path.join(suite, "test_some.py"), "w") as f:
            f.write("".join(f"def test_{i}():\n    pass\n" for i in range(opts.tests)))
        with open(os.path.join(suite, "conftest.py"), "w") as f:
            f.write(STAMPS_CONFTEST)
        modes: dict[str, tuple[str, list[str]]] = {"plain": ("", ["-p", "no:isolate"]),
                                                   "forked": ("", ["-p", "no:isolate", "--forked"])}
        if opts.revs:
            for rev in opts.revs:
                modes[rev] = (export(rev, work, python), ["--isolate"])
        else:
            precompile(python, PROJECT)
            modes["isolated"] = ("", ["--isolate"])
        if opts.user:  # the exported code readable, the suite (stamps) writable by that user
            os.chmod(work, 0o755)
            shutil.chown(suite, opts.user)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
        for _ in range(opts.rounds):
            for name, (path, args) in modes.items():
                runs[name].append(run_once(python, suite, args, path, opts.user))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{opts.tests} trivial test(s), {opts.rounds} rounds round-robin, median ms per phase"
          f"{f', uid of {opts.user}' if opts.user else ''}")
    width = max(12, *(len(name) + 2 for name in modes))
    print(f"{'phase':<14}" + "".join(f"{name:>{width}}" for name in modes))
    for phase in (*PHASES, "total"):
        print(f"{phase:<14}" + "".join(f"{statistics.median(r[phase] for r in runs[name]):>{width}.1f}" for name in modes))
    plain = statistics.median(r["total"] for r in runs["plain"])
    print(f"{'- plain':<14}" + "".join(f"{statistics.median(r['total'] for r in runs[name]) - plain:>{width}.1f}"
                                       for name in modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
