"""How long test processes wait for a core they could run on, and who has it (needs root and perf).

    python benchmarks/preemption.py [--tests 300] [--venv DIR] [--user NAME] [--nocg]

A test process is on the critical path from its fork until it says "done": every moment it is
runnable but not running lengthens the test. ``cpu_by_process.py`` says how much CPU each process
burns; this says how much of that lands *in front of* a test process. It runs the generated suite
of trivial tests under ``perf record -a -e sched:sched_switch -e sched:sched_wakeup -g`` once per
mode and, for every test process (pid neither pytest's nor the factory's; not a process on its way
to ``exec``), adds up:

* **preempted**: from a switch out in state R (runnable) to its next switch in, by whoever took
  the core (the pytest process, the factory, sandbox inits, other test processes, or a kernel
  thread: ``rcu_exp_gp_kthr`` drives expedited RCU grace periods, which unmounts, namespace
  teardowns and network namespace clean-up ask for; ``ksoftirqd`` runs RCU callbacks; kworkers
  run deferred work such as ``cleanup_net``);
* **blocked**: from a switch out in any other state (S, D) to its next switch in, by where it
  blocked (its top kernel frames).

Only the stretch before "done" counts: a test process's first wakeup of the pytest process (its
write of "done"; ``sched:sched_wakeup`` is recorded too) ends it, and so does its exit
(``do_exit`` on the stack) where it never woke the pytest process (pytest-forked's waits for
the exit). Milliseconds per test, medians are not taken (one run per mode; run it twice to see the
spread). ``--user`` runs pytest as that user (rootless) with a virtualenv it can read.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cpu_by_process import perf_main  # noqa: E402

WAKEUP = re.compile(r"^\s*\S+\s+(\d+) .*sched:sched_wakeup: comm=.* pid=(\d+) prio=")
HEADER = re.compile(r"(\d+\.\d+): sched:sched_switch: prev_comm=(.*) prev_pid=(\d+) prev_prio=\d+ "
                    r"prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+) next_prio=\d+")
SKIPPED = ("__schedule", "schedule", "schedule_preempt_disabled", "schedule_timeout", "schedule_hrtimeout_range_clock",
           "preempt_schedule_common", "__cond_resched")
# time, prev comm, prev pid, state, next comm, next pid, stack; a wakeup: (time, "", waker, "wakeup", "", wakee, [])
Switch = tuple[float, str, int, str, str, int, list[str]]


def switches(data: str) -> list[Switch]:
    text = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True, check=True).stdout
    found: list[Switch] = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        w = WAKEUP.search(lines[0]) if lines else None
        if w is not None:
            t = re.search(r"(\d+\.\d+): sched:", lines[0])
            if t is not None:
                found.append((float(t[1]), "", int(w[1]), "wakeup", "", int(w[2]), []))
            continue
        m = HEADER.search(lines[0]) if lines else None
        if m is None:
            continue
        stack = [re.sub(r"^[0-9a-f]+\s+", "", line.strip()).split("+")[0].split(" (")[0] for line in lines[1:]]
        found.append((float(m[1]), m[2], int(m[3]), m[4], m[5], int(m[6]), stack))
    return found


def _roles(found: list[Switch]) -> tuple[int, int]:
    """(pytest process, factory): the two Python processes with the most switches, the pytest
    process first to appear (the factory is 0 where there is none)."""
    counts = collections.Counter(s[2] for s in found if s[1] == "python" and s[3] != "wakeup")
    busy = [pid for pid, n in counts.most_common(2) if n > 50]
    first = {pid: next(i for i, s in enumerate(found) if s[2] == pid) for pid in busy}
    ordered = sorted(busy, key=first.__getitem__)
    return ordered[0], (ordered[1] if len(ordered) > 1 else 0)


def _name(comm: str, pid: int, pytest: int, factory: int) -> str:
    if pid == pytest:
        return "pytest process"
    if pid == factory:
        return "factory"
    if comm in ("pytest_isolate", "isolate-holder") or comm.isdigit():
        return "sandbox inits"
    if comm == "python":
        return "other test processes"
    return re.sub(r"[/:].*$", "", comm)  # ksoftirqd/1 -> ksoftirqd, kworker/u8:0-events -> kworker


def report(mode: str, found: list[Switch], tests: int) -> None:
    pytest, factory = _roles(found)
    out: dict[int, tuple[float, str, bool]] = {}  # test pid -> (switched out at, why, preempted)
    preempted: collections.Counter[str] = collections.Counter()
    blocked: collections.Counter[str] = collections.Counter()
    execs = {s[2] for s in found if any(f in ("bprm_execve", "__do_sys_clone3") for f in s[6])}
    done: set[int] = set()
    for when, comm, pid, state, next_comm, next_pid, stack in found:
        if state == "wakeup":
            if next_pid == pytest and pid not in (pytest, factory):
                done.add(pid)  # its "done": what follows is off the test's path
            continue
        if next_pid in out:
            since, why, runnable = out.pop(next_pid)
            (preempted if runnable else blocked)[why] += when - since
        if comm != "python" or pid in (pytest, factory) or pid in execs or pid in done or "do_exit" in stack:
            continue
        runnable = state.startswith("R")
        frames = [f for f in stack if f not in SKIPPED]
        why = _name(next_comm, next_pid, pytest, factory) if runnable else " < ".join(frames[:3])
        out[pid] = (when, why, runnable)
    total_p, total_b = sum(preempted.values()), sum(blocked.values())
    print(f"== {mode}: {tests} tests; per test, in ms: test processes preempted {1000 * total_p / tests:.3f}, "
          f"blocked {1000 * total_b / tests:.3f}")
    for why, seconds in preempted.most_common(10):
        if 1000 * seconds / tests >= 0.005:
            print(f"    preempted by {why[:50]:<50}{1000 * seconds / tests:>8.3f}")
    for why, seconds in blocked.most_common(5):
        if 1000 * seconds / tests >= 0.005:
            print(f"    blocked in {why[:70]:<70}{1000 * seconds / tests:>8.3f}")


def main() -> int:
    return perf_main(__doc__, ("sched:sched_switch", "sched:sched_wakeup"),
                     lambda mode, data, tests: report(mode, switches(data), tests))


if __name__ == "__main__":
    sys.exit(main())
