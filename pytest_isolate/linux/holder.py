"""A rootless sandbox's holder as a 1.2 kB executable, so a sandbox from a template forks nothing.

Rootless, the factory cannot enter a sandbox's user namespace and come back, so a holder does the
sandbox's last steps: join the template root's user and mount namespaces (see template.py),
unshare the rest, start tinyinit as PID 1 (with CAP_SYS_ADMIN kept across the exec as an ambient
capability), let it mount ``/proc``, pivot into the root, set the hostname, bring ``lo`` up,
report ready and wait for the init. A forked Python holder costs each test ~1.5 ms of CPU: the
fork copies the factory's page tables, its interpreter's writes copy pages, its exit tears them
down. This holder is machine code with no libc (``holder_x86_64.S`` beside this file) started with
``posix_spawn`` from a memfd; it takes its parameters as one block on fd 0 and answers with one
32-byte record on fd 1 (:func:`answer`). Only x86_64; elsewhere, or with
``PYTEST_ISOLATE_NATIVE_HOLDER=0``, :func:`executable` returns None and the factory forks.
"""

from __future__ import annotations

import fcntl
import os
import struct

from . import libc
from .tinyinit import argv, failure, memfd_executable

TYPE_CHECKING = False  # typing costs the factory 1.1 MB of heap: see record.py
if TYPE_CHECKING:
    from typing import Any, Optional, Sequence

    from .template import Template

# .text of holder_x86_64.S (as --64; objcopy -O binary -j .text)
CODE_X86_64 = bytes.fromhex(
    "b89d000000bf01000000be090000000f05b89d000000bf0f000000488d358a0400000f054881ec001000004889e34881"
    "ec000100004531e431c031ff4a8d3423ba001000004c29e2741f0f054883f8fc74e64885c0780774104901c4ebda41bf"
    "09000000e9ad030000488b4b30488d73384885c97412488b064801d84889064883c60848ffc9ebe94989f541bf010000"
    "00b834010000bf03000000be000000100f054885c00f886b030000b834010000bf04000000be000002000f054885c00f"
    "8851030000b803000000bf030000000f05b803000000bf040000000f05b848000000bf05000000be02000000ba010000"
    "000f0541bf02000000b810010000488b3b0f054885c00f880a03000041bf03000000c7042422050820c7442404000000"
    "00b87d0000004889e7488d7424080f054885c00f88dd020000814c241000002000b87e0000004889e7488d7424080f05"
    "4885c00f88bd020000b89d000000bf2f000000be02000000ba150000004531d24531c00f054885c00f889802000041bf"
    "04000000b825010000488d7c2428be000008000f054885c00f8878020000b825010000488d7c2430be000008000f0548"
    "85c00f885e02000048c744244000000000b83a0000000f054885c00f88450200000f84860200004989c6488b44244048"
    "85c00f852e020000b80300000048637c24280f05b80300000048637c24340f05b80100000048637c242c488d35aa0200"
    "00ba010000000f0531c048637c2430488d742448ba010000000f054883f8fc74e74883f8010f858d010000807c24486b"
    "0f858201000041bf06000000b850000000488b7b284801df0f054885c00f88b3010000b89b000000488d3d4d02000048"
    "89fe0f054885c00f8899010000b8a6000000488d3d33020000be020000000f054885c00f887d010000b850000000488d"
    "3d190200000f054885c00f8866010000b80300000048637c242c0f05b80300000048637c24300f0541bf07000000b8aa"
    "000000488b7b184801df488b73100f054885c00f882d01000048837b08000f849100000041bf08000000b829000000bf"
    "02000000be0200080031d20f054885c00f88000100004989c448c74424500000000048c74424580000000048c7442460"
    "0000000066c74424506c6fb8100000004c89e7be13890000488d5424500f054885c00f88be00000066834c246001b810"
    "0000004c89e7be14890000488d5424500f054885c00f889b000000b8030000004c89e70f054531ff31c048c744241000"
    "00000048c744241800000000e89b000000b803000000bf010000000f05b83d0000004c89f731f631d24531d20f054883"
    "f8fc74e931ffeb6d41bf05000000b8f7000000bf010000004c89f6488d94248000000041ba040000014531c00f054885"
    "c0782331c083bc2488000000010f94c048894424104863842498000000488944241831c0eb1548f7d848c74424100000"
    "000048c744241800000000e80c000000bf01000000b8e70000000f054c897c24084889442410b801000000bf01000000"
    "488d742408ba200000000f05c3b82100000048637c242831f60f054885c0782bb82100000048637c2434be010000000f"
    "054885c07815b83b000000488b7b204801df488d73384c89ea0f054889442440b83c000000bf7f0000000f0569736f6c"
    "6174652d686f6c64657200672e002f00"
)

SWITCH = "PYTEST_ISOLATE_NATIVE_HOLDER"  # "0": fork a Python holder instead
STEPS = {1: "join the template's namespaces", 2: "unshare", 3: "keep CAP_SYS_ADMIN across exec", 4: "start the init",
         5: "init", 6: "build root", 7: "sethostname", 8: "bring up lo", 9: "the holder's parameters"}
RECORD = struct.Struct("<qqqq")  # step (0: ready), errno, the init exited, its status or signal
TINY_FD = 5  # where the holder finds tinyinit's memfd (see spawn)
_HEADER = struct.Struct("<8Q")  # flags, lo, hostname length and offset, tinyinit, new root, argc, argv[0]


def executable() -> Optional[str]:
    """A path that executes the holder (a memfd of this process, kept open), or None."""
    return memfd_executable("pytest-isolate-holder", CODE_X86_64, SWITCH)


def parameters(flags: int, lo: bool, hostname: str, tiny: str, new_root: str, proc_points: Sequence[str]) -> bytes:
    """The block the holder reads on fd 0 (see holder_x86_64.S): fields, argv offsets, strings.
    ``tiny``: tinyinit's path as the holder sees it; its argv is tinyinit's (``proc_points``)."""
    args = argv(proc_points)
    strings = [hostname.encode(), os.fsencode(tiny) + b"\0", os.fsencode(new_root) + b"\0",
               *(os.fsencode(arg) + b"\0" for arg in args)]
    offsets = []
    at = _HEADER.size - 8 + 8 * (len(args) + 1)  # the header's last field is argv[0]'s offset
    for text in strings:
        offsets.append(at)
        at += len(text)
    head = _HEADER.pack(flags, int(lo), len(strings[0]), offsets[0], offsets[1], offsets[2], len(args), offsets[3])
    block = head + struct.pack(f"<{len(args)}Q", *offsets[4:], 0) + b"".join(strings)
    if len(block) > 4096:
        raise OSError(0, f"the holder's parameters take {len(block)} bytes (at most 4096)")
    return block


def spawn(path: str, block: bytes, template: Template, tiny_fd: int, ready: int) -> int:
    """Start the holder with ``block`` on its fd 0, ``ready`` as fd 1, the template's user and
    mount namespaces as fds 3 and 4, tinyinit's memfd as fd TINY_FD; returns its pid."""
    params, feed = os.pipe()
    sources = [params, ready, template.ns.fds[libc.CLONE_NEWUSER], template.ns.fds[libc.CLONE_NEWNS], tiny_fd]
    moved = []
    try:
        os.write(feed, block)  # a pipe holds 64 kB: no one needs to read yet
        os.close(feed)
        feed = -1
        for i, fd in enumerate(sources):
            if fd < 6:  # a dup2 below could overwrite it before it is copied
                sources[i] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
                moved.append(sources[i])
        actions: list[Any] = [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in zip(sources, (0, 1, 3, 4, TINY_FD))]
        return os.posix_spawn(path, ["isolate-holder"], {}, file_actions=actions)
    finally:
        for fd in [params, feed, *moved]:
            if fd >= 0:
                os.close(fd)


def answer(data: bytes) -> dict[str, Any]:
    """The factory's answer from the holder's record (what a Python holder reports as JSON)."""
    if len(data) < RECORD.size:
        return {"step": "fork", "errno": None, "message": "the holder died"}
    step, errno, exited, status = RECORD.unpack(data[:RECORD.size])
    if step == 0:
        return {"ok": True}
    name = STEPS.get(step, f"step {step}")
    if step == 5:
        return {"step": name, "errno": None, "message": failure(bool(exited), status)}
    return {"step": name, "errno": errno or None, "message": f"{name} failed in the holder: {os.strerror(errno)}"}
