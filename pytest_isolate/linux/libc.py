"""Thin, typed ctypes wrappers for the syscalls ``os`` lacks (or lacks before 3.12).

Every function declares ``argtypes``/``restype`` and shares one ``errcheck`` that raises
``OSError(errno, "<call>(<args>) failed: <strerror>")`` so a failure names the exact call.
"""

from __future__ import annotations

import ctypes
import os

TYPE_CHECKING = False  # typing costs the factory 1.1 MB of heap: see record.py
if TYPE_CHECKING:
    from typing import Any, Callable, Optional

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
CAP_SYS_ADMIN = 21
_CAPABILITY_VERSION_3 = 0x20080522

def _load_libc() -> ctypes.CDLL:
    """The C library the interpreter runs on, found without ctypes.util (which imports subprocess,
    shutil and tempfile: megabytes that every fork of the sandbox factory would copy)."""
    lib = ctypes.CDLL(None, use_errno=True)  # the interpreter's own symbols: its libc included
    if hasattr(lib, "unshare"):
        return lib
    from ctypes.util import find_library

    return ctypes.CDLL(find_library("c") or "libc.so.6", use_errno=True)


_libc = _load_libc()


def library() -> ctypes.CDLL:
    """The C library itself, for what needs its symbols rather than a call (relay.py)."""
    return _libc


def _errcheck(result: int, func: Any, args: tuple[Any, ...]) -> int:
    if result == -1:
        err = ctypes.get_errno()
        shown = ", ".join(_show(a) for a in args)
        raise OSError(err, f"{func.__name__}({shown}) failed: {os.strerror(err)}")
    return result


def _show(arg: Any) -> str:
    if isinstance(arg, bytes):
        return repr(arg.decode(errors="replace"))
    return repr(arg)


def _declare(name: str, argtypes: list[Any]) -> Callable[..., int]:
    func = getattr(_libc, name)
    func.argtypes = argtypes
    func.restype = ctypes.c_int
    func.errcheck = _errcheck
    return func  # type: ignore[no-any-return]


_c_str = ctypes.c_char_p
_mount = _declare("mount", [_c_str, _c_str, _c_str, ctypes.c_ulong, _c_str])
_umount2 = _declare("umount2", [_c_str, ctypes.c_int])
_unshare = _declare("unshare", [ctypes.c_int])
_setns = _declare("setns", [ctypes.c_int, ctypes.c_int])
_prctl = _declare("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])
_capget = _declare("capget", [ctypes.c_void_p, ctypes.c_void_p])
_capset = _declare("capset", [ctypes.c_void_p, ctypes.c_void_p])
_mprotect = _declare("mprotect", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_STACK = 0x02, 0x20, 0x4000, 0x20000
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYS_PIVOT_ROOT = 155  # x86_64; see _pivot_root_number()


def _fs(path: Optional[str]) -> Optional[bytes]:
    return None if path is None else os.fsencode(path)


def mount(source: Optional[str], target: str, fstype: Optional[str], flags: int = 0, data: Optional[str] = None) -> None:
    """mount(2); ``data`` is the comma-separated option string of the filesystem."""
    _mount(_fs(source), _fs(target), _fs(fstype), flags, _fs(data))


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _umount2(_fs(target), flags)


def unshare(flags: int) -> None:
    """unshare(2): ``os.unshare`` exists only from Python 3.12."""
    _unshare(flags)


def setns(fd: int, nstype: int) -> None:
    """setns(2): ``os.setns`` exists only from Python 3.12."""
    _setns(fd, nstype)


def prctl(option: int, arg2: int = 0) -> None:
    """prctl(2) for the integer options we use (PDEATHSIG, CHILD_SUBREAPER)."""
    _prctl(option, arg2, 0, 0, 0)


def set_name(name: bytes) -> None:
    """prctl(PR_SET_NAME): what ``ps`` and ``/proc/PID/comm`` show for the calling thread (15 bytes)."""
    buf = ctypes.create_string_buffer(name[:15])
    _prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def ambient_capabilities() -> bool:
    """Whether this kernel has ambient capabilities (Linux 4.3; asked without changing anything)."""
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_SYS_ADMIN, 0, 0)
    except OSError:
        return False
    return True


def keep_across_exec(cap: int) -> None:
    """Make capability ``cap`` (one we have, e.g. in a user namespace we just made) survive our
    next execve although we are not uid 0 there: add it to the inheritable set, then raise it as
    an *ambient* capability (capabilities(7)). ``cap`` must be below 32."""
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}: capabilities 0-31, 32-63
    _capget(ctypes.addressof(header), ctypes.addressof(data))
    data[2] |= 1 << cap
    _capset(ctypes.addressof(header), ctypes.addressof(data))
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)


def _pivot_root_number() -> int:
    machine = os.uname().machine
    return {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(machine, _SYS_PIVOT_ROOT)


_PIVOT_ROOT = _pivot_root_number()


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2), which glibc does not wrap."""
    res = _syscall(ctypes.c_long(_PIVOT_ROOT), _fs(new_root), _fs(put_old))
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root({new_root!r}, {put_old!r}) failed: {os.strerror(err)}")


def mmap_anonymous(size: int, prot: int, flags: int = 0) -> int:
    """mmap(2) of ``size`` bytes of private anonymous memory (plus ``flags``); its address. For
    memory no Python object owns: code to run, a stack for a clone (``mmap.mmap`` is MAP_SHARED)."""
    address = _mmap(None, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap({size}, {prot}, {flags:#x}) failed: {os.strerror(err)}")
    return int(address)


def mprotect(address: int, size: int, prot: int) -> None:
    """mprotect(2)."""
    _mprotect(address, size, prot)
