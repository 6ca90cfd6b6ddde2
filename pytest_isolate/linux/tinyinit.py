"""The sandbox's init as a 400-byte executable, so building a sandbox forks no Python process.

A forked Python init costs each test ~3 ms of CPU: the fork copies the factory's page tables, the
init's interpreter touches (and so copies) pages while it builds the root, and its exit tears them
down. This init is machine code with no libc (``tinyinit_x86_64.S`` beside this file): it sets
``PR_SET_PDEATHSIG`` and its name, blocks SIGTERM/SIGINT/SIGHUP, ignores SIGCHLD (so the kernel reaps the
orphans re-parented to it), waits for the factory's go on fd 0, mounts ``/proc`` at each of its
arguments (from inside the new PID namespace, which only PID 1 or a later member can), says ready on
fd 1, closes fds 0-2, and then forwards each blocked signal it receives to PID 2, forever.

The factory builds the root in its own process around it (see factory.py) and starts it with
``posix_spawn`` (vfork: no page tables copied) from a memfd. Only x86_64 has one; elsewhere
:func:`executable` returns None and the factory forks a Python init as before.
"""

from __future__ import annotations

import os
import platform
import struct

TYPE_CHECKING = False  # typing costs the factory 1.1 MB of heap: see record.py
if TYPE_CHECKING:
    from typing import Optional, Sequence

# .text of tinyinit_x86_64.S (as --64; objcopy -O binary -j .text)
CODE_X86_64 = bytes.fromhex(
    "b89d000000bf01000000be090000000f05b89d000000bf0f000000488d35130100000f05b80e00000031ff488d35d500"
    "000031d241ba080000000f05b80d000000bf11000000488d35c200000031d241ba080000000f055031c031ff4889e6ba"
    "010000000f054883f801bf7d0000000f858b000000488d5c2418488b334885f67428b8a5000000488d3da10000004889"
    "fa41ba0e0000004531c00f0589c7f7df85c0755c4883c308ebd0b801000000bf01000000488d3579000000ba01000000"
    "0f05bb02000000b80300000089df0f05ffcb79f3b880000000488d3d2700000031f631d241ba080000000f0585c07ee4"
    "89c6b83e000000bf020000000f05ebd4b8e70000000f0503400000000000000100000000000000000000000000000000"
    "00000000000000000000000000000070726f63006b7079746573745f69736f6c61746500"
)

SWITCH = "PYTEST_ISOLATE_TINYINIT"  # "0": fork a Python init instead (the factory reads it)
NOT_STARTED = 125  # its exit status when the factory's go never came
_BASE = 0x10000  # where the one segment is loaded (the code is position independent)
_HEADERS = 64 + 56  # ELF header + one program header


def elf(code: bytes, machine: int = 0x3E) -> bytes:
    """A static ELF64 executable: one read+execute segment holding the headers and ``code``, which
    starts right after them."""
    size = _HEADERS + len(code)
    header = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                         2, machine, 1, _BASE + _HEADERS, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R|X
    return header + segment + code


def memfd_executable(name: str, code: bytes, switch: str) -> Optional[str]:
    """``/proc/self/fd/N`` of a memfd (kept open) holding :func:`elf` of x86_64 ``code``, or None:
    not x86_64, no memfds, or the environment variable ``switch`` is "0"."""
    if os.environ.get(switch) == "0" or platform.machine() not in ("x86_64", "AMD64") or not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(fd, elf(code))
    except OSError:
        return None
    return f"/proc/self/fd/{fd}"


def executable() -> Optional[str]:
    """A path that executes the init (a memfd of this process, kept open), or None: no init for
    this machine, memfds cannot be executed (``vm.memfd_noexec``, a security module), or
    ``PYTEST_ISOLATE_TINYINIT=0`` asks for the Python init."""
    path = memfd_executable("pytest-isolate-init", CODE_X86_64, SWITCH)
    if path is None:
        return None
    fd = int(path.rsplit("/", 1)[1])
    if not _runs(path):
        os.close(fd)
        return None
    return path


def _runs(path: str) -> bool:
    """Whether the init starts here: given no go (EOF), it must exit with NOT_STARTED."""
    go_read, go = os.pipe()
    os.close(go)
    ready_read, ready = os.pipe()
    try:
        pid = spawn(path, (), go_read, ready)
    except OSError:
        return False
    finally:
        os.close(go_read)
        os.close(ready)
        os.close(ready_read)
    status = os.waitpid(pid, 0)[1]
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == NOT_STARTED


def argv(proc_points: Sequence[str]) -> list[str]:
    """The init's command line: its name, then where to mount a ``/proc``."""
    return ["pytest_isolate-init", *proc_points]


def spawn(path: str, proc_points: tuple[str, ...], go: int, ready: int) -> int:
    """Start the init (``posix_spawn``: the child shares our memory until it executes), with ``go``
    as its fd 0 and ``ready`` as its fd 1; born into our PID namespace for children."""
    actions = [(os.POSIX_SPAWN_DUP2, go, 0), (os.POSIX_SPAWN_DUP2, ready, 1)]
    return os.posix_spawn(path, argv(proc_points), {}, file_actions=actions)


def failure(exited: bool, code: int) -> str:
    """Why an init that never said ready ended: it ``exited`` with ``code``, or a signal ``code`` killed it."""
    if not exited:
        return f"the sandbox's init was killed by signal {code}"
    if code == NOT_STARTED:
        return "the sandbox's init got no go from the factory"
    return f"mount of /proc by the sandbox's init failed: {os.strerror(code)}"
