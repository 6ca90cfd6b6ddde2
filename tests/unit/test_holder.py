"""The native holder (linux/holder.py): its machine code, its parameter block, its answers.

Whole sandboxes made by it run in every rootless isolated test on x86_64 (a test from a template
root: see test_templates.py); here the pieces, and a failing holder started for real.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_isolate.linux import holder, libc

from conftest import assembled, need

SOURCE = Path(holder.__file__).with_name("holder_x86_64.S")


def test_code_is_the_assembled_source(tmp_path: Path) -> None:
    assert assembled(SOURCE, tmp_path) == holder.CODE_X86_64, "re-assemble it (see conftest.assembled) and paste its hex into holder.py"


def test_parameter_block_layout() -> None:
    block = holder.parameters(0x1234, True, "node-a", "/old/tiny", "/newroot", ("/newroot/proc",))
    flags, lo, length, host, tiny, new, argc, arg0, arg1, end = struct.unpack_from("<10Q", block)
    assert (flags, lo, length, argc, end) == (0x1234, 1, 6, 2, 0)

    def text(offset: int, size: int = -1) -> bytes:
        return block[offset:offset + size] if size >= 0 else block[offset:block.index(b"\0", offset)]

    assert text(host, length) == b"node-a"
    assert (text(tiny), text(new), text(arg0), text(arg1)) == (b"/old/tiny", b"/newroot", b"pytest_isolate-init", b"/newroot/proc")


def test_answers() -> None:
    assert holder.answer(holder.RECORD.pack(0, 0, 0, 0)) == {"ok": True}
    assert holder.answer(holder.RECORD.pack(2, errno.EPERM, 0, 0)) == {
        "step": "unshare", "errno": errno.EPERM, "message": "unshare failed in the holder: Operation not permitted"}
    died = holder.answer(holder.RECORD.pack(5, 0, 0, 9))
    assert died["step"] == "init" and "killed by signal 9" in died["message"]
    assert holder.answer(b"")["message"] == "the holder died"


def test_a_failing_holder_names_its_step(tmp_path: Path) -> None:
    """Started for real with a "template" whose namespaces are no namespaces: setns says EINVAL,
    and the record comes back on the ready pipe."""
    path = holder.executable()
    need(path is not None or platform.machine() != "x86_64", "memfd executables (for the native holder)")
    if path is None:
        pytest.skip(f"no native holder for {platform.machine()}")
    not_a_namespace = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    fake: Any = SimpleNamespace(ns=SimpleNamespace(fds={libc.CLONE_NEWUSER: not_a_namespace, libc.CLONE_NEWNS: not_a_namespace}))
    read, ready = os.pipe()
    try:
        block = holder.parameters(0, False, "x", "/nonexistent", "/nonexistent", ())
        pid = holder.spawn(path, block, fake, not_a_namespace, ready)
        os.close(ready)
        ready = -1
        data = b""
        while chunk := os.read(read, 64):
            data += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        for fd in (read, ready, not_a_namespace):
            if fd >= 0:
                os.close(fd)
    assert holder.answer(data) == {"step": "join the template's namespaces", "errno": errno.EINVAL,
                                   "message": "join the template's namespaces failed in the holder: Invalid argument"}
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1
