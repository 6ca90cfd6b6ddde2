"""The tinyinit executable: its bytes are the checked-in assembly, wrapped in a valid ELF header.

Its behaviour (PID 1 that reaps, forwards signals, mounts /proc) is tested through the plugin in
test_namespaces.py; here only what needs no process of its own, and a subprocess for the rest.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assembled, need
from pytest_isolate.engine.factory import _proc_last
from pytest_isolate.linux import tinyinit
from pytest_isolate.linux.mounts import Step
from pytest_isolate.linux.rootfs import RootOptions

SOURCE = Path(tinyinit.__file__).with_name("tinyinit_x86_64.S")


def test_elf_header_points_at_the_code() -> None:
    image = tinyinit.elf(tinyinit.CODE_X86_64)
    magic, cls, data, _, machine, _, entry, phoff = struct.unpack_from("<4sBB10xHHIQQ", image)
    assert (magic, cls, data, machine) == (b"\x7fELF", 2, 1, 0x3E)
    kind, flags, offset, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", image, phoff)
    assert (kind, flags, offset) == (1, 5, 0)  # PT_LOAD, read+execute, the whole file
    assert filesz == memsz == len(image)
    assert image[entry - vaddr:] == tinyinit.CODE_X86_64


def test_code_is_the_assembled_source(tmp_path: Path) -> None:
    assert assembled(SOURCE, tmp_path) == tinyinit.CODE_X86_64, "re-assemble it (see conftest.assembled) and paste its hex into tinyinit.py"


def test_executable_starts_here_unless_switched_off() -> None:
    """In a subprocess (the suite never forks itself): on x86_64 the probe start must succeed."""
    code = "from pytest_isolate.linux import tinyinit; print(tinyinit.executable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    need(os.uname().machine == "x86_64", "an x86_64 machine (the only tinyinit so far)")
    assert out.startswith("/proc/self/fd/")
    env = dict(os.environ, PYTEST_ISOLATE_TINYINIT="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "None"


def test_failure_names_the_cause() -> None:
    assert "no go" in tinyinit.failure(True, tinyinit.NOT_STARTED)
    assert "mount of /proc" in tinyinit.failure(True, 1) and os.strerror(1) in tinyinit.failure(True, 1)
    assert "signal 9" in tinyinit.failure(False, 9)


@pytest.mark.parametrize(("writable", "fits"), [((), True), (("/srv",), True), (("/proc/sys",), False),
                                                (("/proc",), False), (("/processes",), True)])
def test_proc_mounted_last_only_when_nothing_goes_below_it(writable: tuple[str, ...], fits: bool) -> None:
    root = RootOptions(steps=(Step("rootlayer", "/"), Step("proc", "/proc")), writable=writable)
    assert _proc_last(root) is fits
