"""Rootless: fork the test process into a sandbox with one copy of the pytest process, not two.

Rootless, the test process must be born in the sandbox's PID namespace, and only a process inside
the sandbox's user namespace may point its children there; the pytest process cannot enter that
namespace and come back. So a relay joins it and makes the test process. A relay that forks it
(launch.py's Python relay) copies the pytest process's page tables twice per test and tears them
down twice: about 1.5 ms more CPU on a 30 MB process (``benchmarks/native_relay.py``).

This relay is forked once, as ``os.fork`` forks (glibc's ``fork``, so ``pthread_atfork`` handlers
run, and CPython's fork hooks around it), and then runs only machine code (``relay_x86_64.S``
beside this file): it joins the namespaces and makes the test process with ``clone(CLONE_VM)``,
which shares the relay's memory instead of copying it, then waits for it on a stack of its own and
writes how it ended to a pipe (:func:`read_status`). The test process returns from
:meth:`Native.fork` as from ``os.fork()``, with CPython's after-fork code run first (else a request
for the GIL that another thread made before the fork could make it drop the GIL and wait forever
for a thread it does not have). The pytest process goes on as soon as the fork returns, as it does as root:
the relay's joins and the clone happen while it does. (An earlier relay shared the pytest
process's memory and forked the test process; the pytest process had to wait, with every signal
blocked, until that fork was done: twice as long as a fork of its own.)

Only on x86_64 with glibc (it also needs where glibc keeps a thread's TID, which libc exports for
debuggers). Elsewhere, where anonymous memory cannot be made executable (a security module's
``execmem`` rule), if its self-test fails, or with ``PYTEST_ISOLATE_NATIVE_RELAY=0``,
:func:`native` returns None and launch.py forks a Python relay as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
import time

from . import libc
from .tinyinit import memfd_executable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Sequence

# .text of relay_x86_64.S (as --64; objcopy -O binary -j .text)
CODE_X86_64 = bytes.fromhex(
    "535541544155415641574889fb4883ec08ff5350ff1385c074264c63e04d85e47909ff53384c632049f7dcff53584883"
    "c4084c89e0415f415e415d415c5d5bc34883c408b89d000000bf01000000be090000000f05b8da00000031ff0f05b811"
    "01000031ffbe180000000f05b8030000008b7b280f054c8b7b204c8b63104c8b6b08bd010000004d85ed7422b8340100"
    "00498b3c24498b7424080f054885c00f88b90000004983c41049ffcdebd9488b73484885f6741f64488b3c2500000000"
    "48037b40ba0100000041ba53300553b84e0100000f054c8b6b68bd020000004989e4488b6318b838000000bf11010001"
    "4c89e631d24c8b53304531c00f054885c0747978594d85ff7512b84800000031ffbe0200000031d20f05eb0cb8210000"
    "004c89ff31f60f054d85ed0f88980000006a00488d05ed00000050b8420100004c89ef488d35ea0000004889e24531d2"
    "41b8001000000f054883c410eb6bf7d84883ec10892c2489442404b8210000004c89ff31f60f05e991000000b8030000"
    "004c89ff0f05488b73484885f6742864488b3c250000000048037b4031d241ba53300553b84e0100000f054885c07407"
    "c74704feffffff4883ec08ff53604883c40831c0e96cfeffffb89d000000bf0f000000488d354d0000000f054883ec10"
    "c7042400000000c7442404ffffffffb83d00000048c7c7ffffffff488d74240431d24531d20f054883f8fc74e2b80100"
    "000031ff4889e6ba080000000f05b83c00000031ff0f0569736f6c6174652d72656c6179000f1f00c901000000000000"
)


SWITCH = "PYTEST_ISOLATE_NATIVE_RELAY"  # "0": always fork a Python relay
STACK = 16 * 1024  # the relay's, after the clone: a wait4 and a write
STAGES = {1: "setns", 2: "clone"}
_SIGSET = 128  # bytes in glibc's sigset_t
_REPORT = struct.Struct("ii")  # what the relay writes once: stage (0: the status follows), value
_PAGE = os.sysconf("SC_PAGESIZE")


class RelayError(OSError):
    """The relay could not be forked (``stage`` "fork"), join the sandbox ("setns") or make the
    test process ("clone")."""

    def __init__(self, errno: int, stage: str) -> None:
        super().__init__(errno, f"{stage} failed in the relay: {os.strerror(errno)}")
        self.stage = stage


class Native:
    """The relay's code in an executable page, its stack, and what the call needs from libc."""

    def __init__(self) -> None:
        lib = libc.library()
        code = libc.mmap_anonymous(_PAGE, libc.PROT_READ | libc.PROT_WRITE)
        ctypes.memmove(code, CODE_X86_64, len(CODE_X86_64))
        libc.mprotect(code, _PAGE, libc.PROT_READ | libc.PROT_EXEC)
        self._call = ctypes.PYFUNCTYPE(ctypes.c_long, ctypes.c_void_p)(code)  # the GIL stays held
        address = ctypes.cast(lib.fork, ctypes.c_void_p).value
        errno_location = ctypes.cast(getattr(lib, "__errno_location"), ctypes.c_void_p).value
        if not address or not errno_location:
            raise OSError(0, "no fork or __errno_location in the C library")
        self._fork, self._errno = address, errno_location
        self._tid = _tid_offset(lib)
        self._self = lib.pthread_self
        self._self.restype, self._self.argtypes = ctypes.c_void_p, []
        self._rseq = _rseq(lib)
        # CPython's fork hooks, called by the relay's code around the fork (see relay_x86_64.S)
        self._hooks = [ctypes.cast(getattr(ctypes.pythonapi, name), ctypes.c_void_p).value or 0
                       for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child")]
        if not all(self._hooks):
            raise OSError(0, "no PyOS_BeforeFork/AfterFork_* in this interpreter")
        # signal masks set with libc, not signal.pthread_sigmask: that returns the old mask as a set
        # of Signals members, 64 enum lookups (0.15 ms) when restoring from "all blocked"
        self._sigmask = lib.pthread_sigmask
        self._sigmask.restype, self._sigmask.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self._all = ctypes.create_string_buffer(b"\xff" * _SIGSET, _SIGSET)
        # Each relay's copy of this mapping is its stack; the test process, sharing the relay's
        # memory, never touches it. A guard page below.
        base = libc.mmap_anonymous(STACK + _PAGE, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_NORESERVE | libc.MAP_STACK)
        libc.mprotect(base, _PAGE, libc.PROT_NONE)
        self._stack = base + STACK + _PAGE
        # what the relay executes once the test process exists: the code from the waiter on (see
        # relay_x86_64.S, whose last 8 bytes say where it starts)
        waiter = memfd_executable("pytest-isolate-relay", CODE_X86_64[int.from_bytes(CODE_X86_64[-8:], "little"):-8], SWITCH)
        if waiter is None:
            raise OSError(0, "no memfd for the relay's waiter")
        self._waiter = int(waiter.rsplit("/", 1)[1])

    def fork(self, joins: Sequence[tuple[int, int]], charged: bool = True) -> tuple[int, int]:
        """Like ``os.fork()``, with the child born in the namespaces of ``joins`` ((fd, nstype) for
        setns(2), in order). In the child: ``(0, -1)``. In the parent: (the relay's pid, a pipe the
        relay writes to once: :func:`read_status`). The relay exits after that; reap it. Raises
        RelayError if the fork failed; a failed join or clone is reported on the pipe.

        ``charged``: the child joins a memory cgroup of its own, so the relay executes its waiter
        to hand it its memory (0.1 ms of CPU); without, it waits as it is."""
        sys.audit("os.fork")
        pairs = (ctypes.c_long * (2 * len(joins) or 1))(*[value for pair in joins for value in pair])
        gate, report = os.pipe()
        offset, length = self._rseq
        args = (ctypes.c_long * 14)(self._fork, len(joins), ctypes.addressof(pairs), self._stack, report, gate,
                                    self._self() + self._tid, self._errno, offset, length, *self._hooks,
                                    self._waiter if charged else -1)
        mask = ctypes.create_string_buffer(_SIGSET)
        self._sigmask(signal.SIG_BLOCK, self._all, mask)
        relay = self._call(ctypes.addressof(args))  # fork hooks run inside, as os.fork runs them
        self._sigmask(signal.SIG_SETMASK, mask, None)
        if relay == 0:
            return 0, -1  # the pipe's ends: closed by the relay before its clone, and by us after
        os.close(report)
        if relay < 0:
            os.close(gate)
            raise RelayError(-relay, "fork")
        return relay, gate


def read_status(fd: int) -> Optional[int]:
    """The test process's wait status the relay reported on ``fd`` (blocks until the relay has
    written or exited), or None if it did not say; raises RelayError if it could not start it."""
    data = b""
    while len(data) < _REPORT.size:
        chunk = os.read(fd, _REPORT.size - len(data))
        if not chunk:
            return None
        data += chunk
    stage, value = _REPORT.unpack(data)
    if stage:
        raise RelayError(value, STAGES.get(stage, "relay"))
    return None if value == -1 else value


def _tid_offset(lib: ctypes.CDLL) -> int:
    """Where in its thread descriptor glibc keeps a thread's TID: the relay has the kernel write
    the test process's there (CLONE_CHILD_SETTID), as glibc's fork does. libc describes the field
    for debuggers (libthread_db): bits, count, offset."""
    try:
        bits, count, offset = (ctypes.c_uint32 * 3).in_dll(lib, "_thread_db_pthread_tid")
    except ValueError:
        raise OSError(0, "the C library does not say where it keeps a thread's TID (_thread_db_pthread_tid)") from None
    if (bits, count) != (32, 1):
        raise OSError(0, f"unexpected _thread_db_pthread_tid: {bits} bits, count {count}")
    return int(offset)


def _rseq(lib: ctypes.CDLL) -> tuple[int, int]:
    """(offset from the thread pointer, length to register) of this thread's rseq area, or (0, 0):
    glibc before 2.35, or rseq off (``glibc.pthread.rseq=0``)."""
    try:
        offset = ctypes.c_long.in_dll(lib, "__rseq_offset").value
        size = ctypes.c_uint.in_dll(lib, "__rseq_size").value
    except ValueError:
        return 0, 0
    return (offset, max(size, 32)) if size else (0, 0)


_NATIVE: list[Optional[Native]] = []
_WHY: list[str] = []


def native() -> Optional[Native]:
    """This process's native relay, made and tested on first use; None where there is none (why:
    :func:`why_not`)."""
    if not _NATIVE:
        made: Optional[Native] = None
        why = _unsupported()
        if not why:
            try:
                made = Native()
                why = _self_test(made)
            except (OSError, AttributeError, ValueError) as exc:
                why = f"cannot set it up: {exc}"
        _WHY.append(why)
        _NATIVE.append(None if why else made)
    return _NATIVE[0]


def why_not() -> str:
    """Why :func:`native` returned None ("" if it did not, or was not asked yet)."""
    return _WHY[0] if _WHY else ""


def _unsupported() -> str:
    if os.environ.get(SWITCH) == "0":
        return f"{SWITCH}=0"
    machine = os.uname().machine
    if machine != "x86_64":
        return f"no native relay for {machine}"
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else None
    if not glibc:
        return "not glibc"
    if sys.implementation.name != "cpython" or not getattr(sys, "_is_gil_enabled", lambda: True)():
        return "needs CPython with its GIL"
    return ""


def _self_test(relay: Native) -> str:
    """Fork a child that checks glibc's copy of its TID and that its relay became the waiter, then
    exits 42; "" if that status comes back, else what went wrong."""
    try:
        pid, report = relay.fork(())
    except OSError as exc:
        return f"its self-test failed: {exc}"
    if pid == 0:
        code = 42 if ctypes.c_int.from_address(relay._self() + relay._tid).value == os.getpid() else 43
        for _ in range(2000):  # the relay executes the waiter while we run: at most 2 s
            try:
                if "pytest-isolate-relay" in os.readlink(f"/proc/{os.getppid()}/exe"):
                    break
            except OSError:
                pass
            time.sleep(0.001)
        else:
            code = 44
        os._exit(code)
    try:
        status = read_status(report)
    except RelayError as exc:
        return f"its self-test failed: {exc}"
    finally:
        os.close(report)
        os.waitpid(pid, 0)
    exited = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
    if exited == 43:
        return "its self-test's child found another TID where glibc keeps its own"
    if exited == 44:
        return "the relay could not execute its waiter (a memfd): memory would be charged to the wrong cgroup"
    if exited != 42:
        return f"its self-test's child did not exit 42 (wait status {status})"
    return ""
