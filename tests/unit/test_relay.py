"""The native relay (linux/relay.py): its machine code, and a fork through it, in a subprocess.

The suite never forks in its own process, so each check runs a script with ``sys.executable``
that forks through the relay and prints what it saw as JSON. Where the host has no native relay
(not x86_64 with glibc) the checks skip, naming why, and fail with PYTEST_ISOLATE_MUST_WORK=1.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.linux import relay

from conftest import assembled, need

SOURCE = Path(relay.__file__).with_name("relay_x86_64.S")
NATIVE_HOST = platform.machine() == "x86_64" and bool(os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else "")

PRELUDE = """
import ctypes, errno, json, os, signal, sys
from pytest_isolate.linux import relay
native = relay.native()
if native is None:
    print(json.dumps({"why": relay.why_not()})); sys.exit(0)
out = {"why": ""}
def finish(pid, report):
    status = relay.read_status(report)
    os.close(report)
    os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else status
"""


def run_script(body: str, **env: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, check=False)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def checked(body: str) -> dict[str, Any]:
    data = run_script(body)
    need(NATIVE_HOST, "a native relay (x86_64 with glibc)")
    assert data["why"] == "", f"no native relay on an x86_64 glibc host: {data['why']}"
    return data


def test_code_is_the_assembled_source(tmp_path: Path) -> None:
    assert assembled(SOURCE, tmp_path) == relay.CODE_X86_64, "re-assemble it (see conftest.assembled) and paste its hex into relay.py"


def test_the_child_returns_as_from_fork_and_its_status_comes_back() -> None:
    data = checked("""
import threading
hooks = []
os.register_at_fork(before=lambda: hooks.append("before"), after_in_parent=lambda: hooks.append("parent"),
                    after_in_child=lambda: hooks.append("child"))
me = os.getpid()
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
pid, report = native.fork(())
if pid == 0:
    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_void_p
    tid = ctypes.c_int.from_address(libc.pthread_self() + native._tid).value
    ok = (os.getppid() != me and hooks == ["before", "child"] and tid == os.getpid()
          and threading.get_native_id() == os.getpid()
          and signal.pthread_sigmask(signal.SIG_BLOCK, []) == {signal.SIGUSR1})
    os._exit(7 if ok else 8)
out.update(status=finish(pid, report), hooks=hooks, mask=sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
print(json.dumps(out))
""")
    assert data["status"] == 7, "the child saw the wrong fork hooks, parent, TID or signal mask"
    assert data["hooks"] == ["before", "parent"]
    assert data["mask"] == [10], "the caller's own signal mask must come back unchanged"  # SIGUSR1


def test_a_request_for_the_gil_pending_at_the_fork_does_not_hang_the_child() -> None:
    """Another thread asks for the GIL while a ``before`` fork hook holds it (C all the way, so no
    bytecode runs between it and the fork): the request is copied into the child, which must run
    CPython's after-fork code before any Python, as os.fork does, or it waits forever."""
    data = checked("""
import functools, threading
def spin():
    while True:
        sum(range(100))
threading.Thread(target=spin, daemon=True).start()
os.register_at_fork(before=functools.partial(ctypes.PyDLL(None).usleep, 20000))  # holds the GIL 20 ms
statuses = []
for _ in range(3):
    pid, report = native.fork(())
    if pid == 0:
        os._exit(7)
    statuses.append(finish(pid, report))
out.update(statuses=statuses)
print(json.dumps(out))
""")
    assert data["statuses"] == [7, 7, 7]


def test_pthread_atfork_handlers_run_as_for_os_fork() -> None:
    """prepare and parent in the caller, child in the relay, whose memory the child shares: as
    glibc's fork runs them, which libraries such as OpenBLAS rely on."""
    data = checked("""
seen = []
CB = ctypes.CFUNCTYPE(None)
handlers = [CB(lambda tag=tag: seen.append(tag)) for tag in ("prepare", "parent", "child")]
register = getattr(ctypes.CDLL(None), "__register_atfork")
register.argtypes = [CB, CB, CB, ctypes.c_void_p]
assert register(*handlers, None) == 0
pid, report = native.fork(())
if pid == 0:
    os._exit(7 if seen == ["prepare", "child"] else 8)
out.update(status=finish(pid, report), seen=seen)
print(json.dumps(out))
""")
    assert data["status"] == 7
    assert data["seen"] == ["prepare", "parent"]


def test_the_child_has_rseq_registered_again() -> None:
    """The kernel drops rseq for a CLONE_VM child; glibc's sched_getcpu would read a stale CPU."""
    data = checked("""
libc = ctypes.CDLL(None, use_errno=True)
offset, length = relay._rseq(libc)
if not length:
    print(json.dumps({"why": "", "skip": "glibc without rseq"})); sys.exit(0)
pid, report = native.fork(())
if pid == 0:
    libc.pthread_self.restype = ctypes.c_void_p
    libc.syscall.restype = ctypes.c_long
    area = ctypes.c_void_p(libc.pthread_self() + offset)
    again = libc.syscall(ctypes.c_long(334), area, ctypes.c_uint(length), 0, ctypes.c_uint(0x53053053))
    os._exit(7 if again == -1 and ctypes.get_errno() == errno.EBUSY else 8)
out.update(status=finish(pid, report))
print(json.dumps(out))
""")
    if "skip" in data:
        pytest.skip(data["skip"])
    assert data["status"] == 7, "registering rseq again did not say EBUSY: the child had none"


def test_a_failed_join_is_an_error_naming_the_step_and_errno() -> None:
    data = checked("""
pid, report = native.fork([(987, 0x10000000)])  # no such fd: setns says EBADF
if pid == 0:
    os._exit(0)  # never: the relay makes no child
try:
    relay.read_status(report)
except relay.RelayError as exc:
    out.update(stage=exc.stage, errno=exc.errno, message=str(exc))
os.waitpid(pid, 0)
print(json.dumps(out))
""")
    assert (data["stage"], data["errno"]) == ("setns", 9)
    assert "setns failed in the relay: Bad file descriptor" in data["message"]


def test_a_relay_killed_before_it_reports_reports_nothing() -> None:
    """No status, no hang: the pipe's only write end died with the relay (the child closed its copy)."""
    data = checked("""
import signal, time
said, tell = os.pipe()
pid, report = native.fork(())
if pid == 0:
    os.write(tell, str(os.getpid()).encode().ljust(16))
    time.sleep(60)
    os._exit(0)
child = int(os.read(said, 16))
os.kill(pid, signal.SIGKILL)
start = time.monotonic()
out.update(status=relay.read_status(report), seconds=time.monotonic() - start)
os.kill(child, signal.SIGKILL)
os.waitpid(pid, 0)
print(json.dumps(out))
""")
    assert data["status"] is None
    assert data["seconds"] < 5


def test_a_child_that_churns_its_memory_leaves_the_relay_and_its_report_intact() -> None:
    """The child shares the relay's memory: it may change any of it but the relay's stack, a
    mapping made once and used by every relay (each its own copy)."""
    data = checked("""
import sys
sys.setrecursionlimit(20000)
def deep(n):
    return 0 if n == 0 else 1 + deep(n - 1)
statuses = []
for code in range(5, 10):
    pid, report = native.fork(())
    if pid == 0:
        junk = [bytearray(4096) for _ in range(20000)]  # 80 MB written, then freed
        del junk
        os._exit(code if deep(5000) == 5000 else 99)
    statuses.append(finish(pid, report))
out.update(statuses=statuses)
print(json.dumps(out))
""")
    assert data["statuses"] == [5, 6, 7, 8, 9]


def test_with_no_cgroup_to_charge_the_relay_waits_itself() -> None:
    """``charged=False`` (the test has no cgroup of its own): no exec, the same status and TID."""
    data = checked("""
import time
libc = ctypes.CDLL(None)
libc.pthread_self.restype = ctypes.c_void_p
said, tell = os.pipe()
pid, report = native.fork((), charged=False)
if pid == 0:
    time.sleep(0.05)  # a relay that executes its waiter has done so by now
    os.write(tell, os.readlink(f"/proc/{os.getppid()}/exe").encode())
    os._exit(7 if ctypes.c_int.from_address(libc.pthread_self() + native._tid).value == os.getpid() else 8)
out.update(relay=os.read(said, 4096).decode(), me=os.readlink("/proc/self/exe"), status=finish(pid, report))
print(json.dumps(out))
""")
    assert data["status"] == 7
    assert data["relay"] == data["me"], "the relay executed its waiter though nothing was to be charged"


def _memory_cgroup_parent() -> str:
    """Where root may make a memory cgroup here (cgroup v1's memory hierarchy, or v2's root)."""
    if os.path.isfile("/sys/fs/cgroup/memory/cgroup.procs"):
        return "/sys/fs/cgroup/memory"
    try:
        with open("/sys/fs/cgroup/cgroup.subtree_control") as f:
            if "memory" in f.read().split():
                return "/sys/fs/cgroup"
    except OSError:
        pass
    return ""


def test_the_childs_memory_is_charged_to_the_childs_cgroup() -> None:
    """The kernel charges page faults to the cgroup of the memory's owner, the process the child
    shares it with (the relay) until that one executes something else: the relay becomes its
    waiter, so 64 MiB the child copies on write and 32 MiB it allocates count in its own cgroup."""
    if os.getuid() != 0:
        pytest.skip("needs root, to make a memory cgroup (rootless, the cgroup v2 tests of the marker cover it)")
    parent = _memory_cgroup_parent()
    need(bool(parent), "a memory cgroup controller")
    cgroup = os.path.join(parent, f"isolate-relay-test-{os.getpid()}")
    os.mkdir(cgroup)
    try:
        data = checked(f"""
import time
usage = "memory.usage_in_bytes" if os.path.exists({cgroup!r} + "/memory.usage_in_bytes") else "memory.current"
big = bytearray(64 << 20)
for i in range(0, len(big), 4096):
    big[i] = 1
said, tell = os.pipe()
pid, report = native.fork(())
if pid == 0:
    with open({cgroup!r} + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    for i in range(0, len(big), 4096):
        big[i] = 2
    fresh = bytearray(32 << 20)
    for i in range(0, len(fresh), 4096):
        fresh[i] = 3
    with open({cgroup!r} + "/" + usage) as f:
        os.write(tell, f.read().encode())
    os._exit(0)
out.update(charged=int(os.read(said, 64)), status=finish(pid, report))
print(json.dumps(out))
""")
    finally:
        os.rmdir(cgroup)
    assert data["status"] == 0
    assert data["charged"] >= 90 * 2**20, f"only {data['charged'] >> 20} MiB charged to the child's cgroup"


def test_switched_off_by_the_environment() -> None:
    data = run_script("print(json.dumps(out))", **{relay.SWITCH: "0"})
    assert data["why"] == f"{relay.SWITCH}=0"
