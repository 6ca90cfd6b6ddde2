"""Where one test's time goes, step by step, for ``--isolate`` and for pytest-forked, side by side.

    python benchmarks/timeline.py [--tests 300] [--rounds 3] [--nocg] [--venv DIR] [--user NAME]

``overhead.py`` says how long a test takes; this says which step of its cycle takes it. A conftest
in the generated suite of trivial tests wraps, at import, the functions each step starts or ends
in (pytest's protocol hook, the fork, the child's first and last Python line, the wait) and takes
a CLOCK_MONOTONIC stamp there, in the pytest process and in the test process (whose stamps come
back through the channel with ``--isolate``, through a file with pytest-forked). The cycle of one
test, the same steps in both modes:

    before fork     pytest's hook for the test starts .. the fork is called (plan, sandbox, leaf)
    fork            the fork call in the pytest process (root: with its two setns calls; rootless:
                    the relay's clone until it said the test process's pid)
    child wakes     the fork call returned .. the child's first line of ours (or of pytest-forked's)
    child joins     .. its protocol starts (cgroup leaf, namespaces; pytest-forked: its redirects)
    protocol        setup, call and teardown with their reports, sent or serialized
    back to parent  the protocol ended .. the pytest process sees the test done (pytest-forked:
                    the child's exit and its join)
    after           .. the hook returns (reports read, logged; isolate: the sandbox ended)
    between tests   .. pytest's hook for the next test starts

Inside the protocol step, with ``--isolate``, the first report's send and each later one's are
timed too. Printed: the median of each step in each mode (microseconds), their sum, the median interval
between test starts, and the difference. ``--nocg`` adds ``--isolate --isolate-cgroups=off``. ``--rounds`` alternates the modes and takes medians over
all tests of all rounds. Stamps cost a few microseconds each; compare modes, not absolutes.
Uses ``overhead.py``'s virtualenv (pytest 8.4, pytest-forked); ``--user`` as in ``ab.py``.
The conftest's ``pytest_runtest_protocol`` wrapper turns overlapping tests off (see
``--isolate-overlap`` in the reference), so the steps are those of one test after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from overhead import PROJECT, ensure_venv, precompile  # noqa: E402

CONFTEST = r'''
import json, os, time
import pytest

STAMPS = []
OUT = os.environ["TIMELINE_OUT"]


def stamp(tag):
    STAMPS.append((time.monotonic_ns(), tag))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    stamp("item start")
    yield
    stamp("item end")


def pytest_sessionfinish(session):
    with open(OUT, "w") as f:
        json.dump(STAMPS, f)


def wrap(owner, name, before=None, after=None):
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = inner(*args, **kwargs)
        if after:
            after(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapper)


def child_stamps():
    """In the test process: forget the pytest process's stamps, keep ours."""
    del STAMPS[:]
    SENT[:] = [0]
    stamp("child start")


SENT = [0]


try:
    from pytest_isolate.engine import launch
    from pytest_isolate.plugin import protocol
except ImportError:
    launch = None

if launch is not None:
    wrap(launch.Launcher, "_fork", before=lambda *a, **k: stamp("fork start"), after=lambda *a, **k: stamp("fork end"))
    wrap(launch, "_payload", before=lambda *a, **k: child_stamps())
    wrap(launch, "_wait", after=lambda *a, **k: stamp("done seen"))

    def sandboxed(item, chan, inner=protocol._sandboxed_protocol):
        stamp("protocol start")
        code = inner(item, chan)
        stamp("protocol end")
        chan.send("timeline", stamps=STAMPS)
        return code

    protocol._sandboxed_protocol = sandboxed

    def send(chan, config, report, inner=protocol.send_report):
        SENT[0] += 1
        stamp(f"send{min(SENT[0], 2)} start")
        inner(chan, config, report)
        stamp(f"send{min(SENT[0], 2)} end")

    protocol.send_report = send

    def reports(item, outcome, hint, inner=protocol.child_reports):
        for record in outcome.records:
            if record["kind"] == "timeline":
                STAMPS.extend(tuple(s) for s in record["stamps"])
        return inner(item, outcome, hint)

    protocol.child_reports = reports

try:
    import pytest_forked
    import multiprocessing.process as mpp
    from _pytest import runner
except ImportError:
    pytest_forked = None

if pytest_forked is not None:
    CHILD = OUT + ".children"
    wrap(mpp.BaseProcess, "start", before=lambda *a, **k: stamp("fork start"), after=lambda *a, **k: stamp("fork end"))
    wrap(mpp.BaseProcess, "join", after=lambda *a, **k: stamp("done seen"))
    wrap(pytest_forked, "_worker", before=lambda *a, **k: child_stamps())

    def protocol_forked(item, log=True, nextitem=None, inner=runner.runtestprotocol):
        stamp("protocol start")
        result = inner(item, log=log, nextitem=nextitem)
        return result

    runner.runtestprotocol = protocol_forked

    def serialized(rep, inner=pytest_forked.serialize_report):
        result = inner(rep)
        if rep.when == "teardown":  # the last one: marshal and the write of the file follow (~20 us)
            stamp("protocol end")
            with open(CHILD, "a") as f:
                f.write(json.dumps(STAMPS) + "\n")
        return result

    pytest_forked.serialize_report = serialized
'''

SENDS = [("first report sent", "send1 start", "send1 end"), ("later ones, each", "send2 start", "send2 end")]
STEPS = [("before fork", "item start", "fork start"), ("fork", "fork start", "fork end"),
         ("child wakes", "fork end", "child start"), ("child joins", "child start", "protocol start"),
         ("protocol", "protocol start", "protocol end"), ("back to parent", "protocol end", "done seen"),
         ("after", "done seen", "item end"), ("between tests", "item end", "item start")]
MODES = {"isolated": ["--isolate"], "forked": ["-p", "no:isolate", "--forked"]}


def cycles(stamps: list[tuple[int, str]]) -> dict[str, list[float]]:
    """Each step's durations (us), from the stamps of one run in time order."""
    stamps.sort()
    found: dict[str, list[float]] = {name: [] for name, _, _ in STEPS + SENDS}
    last: dict[str, int] = {}
    for t, tag in stamps:
        for name, begin, end in STEPS + SENDS:
            if tag == end and begin in last and (name != "between tests" or "item end" in last):
                found[name].append((t - last[begin]) / 1e3)
        last[tag] = t
        if tag == "item start":
            for key in list(last):
                if key != "item start":
                    del last[key]
    return found


def run(python: str, directory: str, args: list[str], user: str, env: dict[str, str]) -> tuple[dict[str, list[float]], float]:
    out = os.path.join(directory, "timeline.json")
    for path in (out, out + ".children"):
        if os.path.exists(path):
            os.remove(path)
    runas = ["runuser", "-u", user, "--"] if user else []
    proc = subprocess.run([*runas, python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *args],
                          cwd=directory, capture_output=True, text=True, check=False,
                          env=dict(os.environ, TIMELINE_OUT=out, **env))
    if proc.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        stamps = [tuple(s) for s in json.load(f)]
    if os.path.exists(out + ".children"):
        with open(out + ".children") as f:
            for line in f:
                stamps.extend(tuple(s) for s in json.loads(line))
    starts = sorted(t for t, tag in stamps if tag == "item start")
    interval = statistics.median((b - a) / 1e3 for a, b in zip(starts[10:], starts[11:]))
    return cycles(stamps), interval  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--venv", default=os.path.join(PROJECT, ".bench-venv"))
    parser.add_argument("--user", default="", help="run pytest as this user (rootless; from root)")
    parser.add_argument("--nocg", action="store_true", help="also --isolate --isolate-cgroups=off")
    args = parser.parse_args()
    modes = dict(MODES, **({"nocg": ["--isolate", "--isolate-cgroups=off"]} if args.nocg else {}))
    python = ensure_venv(args.venv)
    precompile(python, PROJECT)
    directory = tempfile.mkdtemp(prefix="isolate-timeline-")
    try:
        with open(os.path.join(directory, "test_generated.py"), "w") as f:
            f.write("\n".join(f"def test_{i}():\n    assert {i} >= 0\n" for i in range(args.tests)))
        with open(os.path.join(directory, "conftest.py"), "w") as f:
            f.write(CONFTEST)
        if args.user:
            shutil.chown(directory, args.user)
            for name in os.listdir(directory):
                shutil.chown(os.path.join(directory, name), args.user)
        env = {"PYTHONPATH": PROJECT}
        steps: dict[str, dict[str, list[float]]] = {mode: {name: [] for name, _, _ in STEPS + SENDS} for mode in modes}
        intervals: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, flags in modes.items():
                found, interval = run(python, directory, flags, args.user, env)
                intervals[mode].append(interval)
                for name, values in found.items():
                    steps[mode][name].extend(values)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{args.tests} trivial tests, {args.rounds} rounds, uid {'of ' + args.user if args.user else os.getuid()}; "
          "median per step (us)")
    others = [mode for mode in modes if mode not in ("isolated", "forked")]
    print(f"{'step':16}{'isolated':>10}{'forked':>10}{'difference':>12}" + "".join(f"{m:>10}" for m in others))
    totals = dict.fromkeys(modes, 0.0)
    for name, _, _ in STEPS:
        medians = {mode: statistics.median(steps[mode][name]) if steps[mode][name] else 0.0 for mode in modes}
        for mode in modes:
            totals[mode] += medians[mode]
        print(f"{name:16}{medians['isolated']:10.0f}{medians['forked']:10.0f}{medians['isolated'] - medians['forked']:12.0f}"
              + "".join(f"{medians[m]:10.0f}" for m in others))
    print(f"{'sum of steps':16}{totals['isolated']:10.0f}{totals['forked']:10.0f}{totals['isolated'] - totals['forked']:12.0f}"
          + "".join(f"{totals[m]:10.0f}" for m in others))
    for name, _, _ in SENDS:  # within the protocol step: --isolate sends each report through the channel
        print(f"  {name:18}" + "".join(f"{statistics.median(steps[m][name]):10.0f}" if steps[m][name] else f"{'':10}"
                                       for m in ("isolated", "forked", *others)))
    median = {mode: statistics.median(intervals[mode]) for mode in modes}
    print(f"{'interval':16}{median['isolated']:10.0f}{median['forked']:10.0f}{median['isolated'] - median['forked']:12.0f}"
          + "".join(f"{median[m]:10.0f}" for m in others))
    return 0


if __name__ == "__main__":
    sys.exit(main())
