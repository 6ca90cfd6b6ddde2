"""Rootless: fork the test process into a sandbox with one copy of the pytest process, not two.

Rootless, the test process must be born in the sandbox's PID namespace, and only a process inside
the sandbox's user namespace may point its children there; the pytest process cannot enter that
namespace and come back. So a relay joins it and forks the test process. A relay forked from the
pytest process copies its page tables once more per test and tears them down again: about 1.5 ms
of CPU and of the test's path on a 30 MB process (``benchmarks/native_relay.py``).

This relay shares the pytest process's memory instead: a ``clone(CLONE_VM)`` child running machine
code (``relay_x86_64.S`` beside this file) on a stack of its own. It joins the namespaces, calls
glibc's ``fork`` (so ``pthread_atfork`` handlers run, as for ``os.fork``), reports the test
process's pid, then waits for it and reports its wait status and rusage on a pipe. The test
process returns from :meth:`Native.fork` as from ``os.fork()``, with CPython's fork hooks run
around it by that code, as ``os.fork`` runs them from C (PyOS_AfterFork_Child before any Python
runs in the child: else a request for the GIL that another thread made before the fork could make
the child drop the GIL and wait forever for a thread it does not have). The caller waits until
the fork is made, with every signal blocked, so nothing in the shared memory moves while it is
copied: on a futex the relay wakes, since a pipe write would wake it on the relay's core, behind
the test process just forked there (see the .S file).

Only on x86_64 with glibc. Elsewhere, where anonymous memory cannot be made executable (a security
module's ``execmem`` rule), if its self-test fails, or with ``PYTEST_ISOLATE_NATIVE_RELAY=0``,
:func:`native` returns None and launch.py forks a Python relay as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
import threading

from . import libc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Sequence

# .text of relay_x86_64.S (as --64; objcopy -O binary -j .text)
CODE_X86_64 = bytes.fromhex(
    "535541544155415641574889fb4883ec08ff53684883c40848896320b838000000bf11012000488b731831d24c8b5348"
    "4531c00f054885c00f84840000004989c47866b8030000008b7b380f0583bb80000000007527488b4348833800741eb8"
    "ca000000488dbb80000000be8000000031d24c8d15af0100000f05ebd031c08b7b40488d7328ba100000000f054883f8"
    "fc74ea4883f810741048c74328e0ffffff48c74330030000004883ec08ff53704883c4084c89e0415f415e415d415c5d"
    "5bc3b89d000000bf01000000be090000000f054c8b7b38b8030000008b7b400f054c8b63104c8b6b08bd010000004d85"
    "ed741eb834010000498b3c24498b7424080f054885c0782e4983c41049ffcdebddbd020000004883e4f0ff1385c00f84"
    "b20000004863c0790bff535048630048f7d8eb0231ed4989c64881eca00000004889042448896c2408b8010000004c89"
    "ff4889e6ba100000000f05c7838000000001000000b8ca000000488dbb80000000be81000000ba010000000f054d85f6"
    "784bb89d000000bf0f000000488d35a50000000f05c744240cffffffffb83d0000004c89f7488d74240c31d24c8d5424"
    "100f054883f8fc74e4b8010000004c89ff488d74240cba940000000f05b83c00000031ff0f05b8030000004c89ff0f05"
    "488b73604885f6742864488b3c250000000048037b5831d241ba53300553b84e0100000f054885c07407c74704feffff"
    "ff488b63204883ec08ff53784883c40831c0e990feffff90000000000000000080f0fa020000000069736f6c6174652d"
    "72656c617900"
)

SWITCH = "PYTEST_ISOLATE_NATIVE_RELAY"  # "0": always fork a Python relay
STACK = 256 * 1024  # touched: a few pages (glibc's fork and the atfork handlers)
STAGES = {1: "setns", 2: "fork", 3: "relay"}
_SIGSET = 128  # bytes in glibc's sigset_t
_STATUS = struct.Struct("i144x")  # what the relay writes when the test process is gone: status + rusage
_PAGE = os.sysconf("SC_PAGESIZE")


class RelayError(OSError):
    """The relay could not join the sandbox (``stage`` "setns") or fork (``stage`` "fork"), or died."""

    def __init__(self, errno: int, stage: str) -> None:
        super().__init__(errno, f"{stage} failed in the relay: {os.strerror(errno)}")
        self.stage = stage


class Native:
    """The relay's code in an executable page, its stacks, and what the call needs from libc."""

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
        self._rseq = _rseq(lib)
        # CPython's fork hooks, called by the relay's code around the clone (see relay_x86_64.S)
        self._hooks = [ctypes.cast(getattr(ctypes.pythonapi, name), ctypes.c_void_p).value or 0
                       for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child")]
        if not all(self._hooks):
            raise OSError(0, "no PyOS_BeforeFork/AfterFork_* in this interpreter")
        # signal masks set with libc, not signal.pthread_sigmask: that returns the old mask as a set
        # of Signals members, 64 enum lookups (0.15 ms) when restoring from "all blocked"
        self._sigmask = lib.pthread_sigmask
        self._sigmask.restype, self._sigmask.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self._all = ctypes.create_string_buffer(b"\xff" * _SIGSET, _SIGSET)
        self._stacks: list[tuple[int, ctypes.c_int]] = []  # (top, busy word: zeroed by the kernel when its relay exits)
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """In a child (of os.fork, or of ours): another thread may have held the lock at the fork;
        the stacks our relays run on stay busy here (the kernel zeroes only our copy's words)."""
        self._lock = threading.Lock()
        self._stacks = []

    def _stack(self) -> tuple[int, ctypes.c_int]:
        """A stack no relay runs on (its relay exited), marked busy; a new one if all are in use.
        A private mapping: the test process must get a copy of it, not share it with the relay."""
        with self._lock:
            for top, busy in self._stacks:
                if busy.value == 0:
                    busy.value = 1
                    return top, busy
            base = libc.mmap_anonymous(STACK + _PAGE, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_NORESERVE | libc.MAP_STACK)
            libc.mprotect(base, _PAGE, libc.PROT_NONE)  # a guard page below it
            stack = (base + STACK + _PAGE, ctypes.c_int(1))
            self._stacks.append(stack)
            return stack

    def fork(self, joins: Sequence[tuple[int, int]]) -> tuple[int, int, int]:
        """Like ``os.fork()``, with the child born in the namespaces of ``joins`` ((fd, nstype) for
        setns(2), in order). In the child: ``(0, 0, -1)``. In the parent: (the relay's pid, the
        child's pid, a pipe the relay writes the child's wait status and rusage to when it is gone:
        :func:`read_status`). The relay exits after that; reap it. Raises RelayError."""
        sys.audit("os.fork")
        pairs = (ctypes.c_long * (2 * len(joins) or 1))(*[value for pair in joins for value in pair])
        gate, report = os.pipe()
        top, busy = self._stack()
        offset, length = self._rseq
        args = (ctypes.c_long * 17)(self._fork, len(joins), ctypes.addressof(pairs), top, 0, 0, 0, report, gate,
                                    ctypes.addressof(busy), self._errno, offset, length, *self._hooks, 0)
        mask = ctypes.create_string_buffer(_SIGSET)
        self._sigmask(signal.SIG_BLOCK, self._all, mask)
        relay = self._call(ctypes.addressof(args))  # fork hooks run inside, as os.fork runs them
        self._sigmask(signal.SIG_SETMASK, mask, None)
        if relay == 0:
            return 0, 0, -1  # the pipe's ends: closed by the relay before its fork, and by us after
        if relay < 0:  # no clone: the report end is still ours
            busy.value = 0
            os.close(report)
            os.close(gate)
            raise RelayError(-relay, "relay")
        pid, stage = args[5], args[6]
        if stage:
            os.close(gate)
            os.waitpid(relay, 0)
            raise RelayError(-pid, STAGES.get(stage, "relay"))
        return relay, pid, gate


def read_status(fd: int) -> Optional[int]:
    """The wait status the relay reported on ``fd`` (blocks until the relay is done), or None."""
    data = b""
    while len(data) < _STATUS.size:
        chunk = os.read(fd, _STATUS.size - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) < _STATUS.size:
        return None
    status: int = _STATUS.unpack(data)[0]
    return None if status == -1 else status


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
    """Fork a child that exits 42 at once; "" if that status comes back, else what went wrong."""
    try:
        pid, child, report = relay.fork(())
    except OSError as exc:
        return f"its self-test failed: {exc}"
    if pid == 0:
        os._exit(42)
    try:
        status = read_status(report)
    finally:
        os.close(report)
        os.waitpid(pid, 0)
    if status is None or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 42 or child <= 0:
        return f"its self-test's child did not exit 42 (wait status {status})"
    return ""
