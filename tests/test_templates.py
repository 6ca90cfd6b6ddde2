"""Template roots: a sandbox copies a root built before and not written since (rootless, and as root).

Each isolated test below records which root it got — the device, ctime and filesystem id of its
top directory (rootless a directory of the template's scratch tmpfs, as root an overlay) — and
whether any earlier test's writes show. A device number is reused once a filesystem is gone, and
two roots built within one tick of the coarse clock share a ctime (as root that made two fresh
roots look like one); the filesystem id is random per mount where the kernel has one (tmpfs and
overlay with a uuid here, kernel 6.18) and the same for every copy of a template. The writing
tests write in every way that leaves a different root behind: a new file in an overlay, a mode
change of an overlay's top directory, a name created and removed again, a new name in a plain
directory of the scratch tree, the root's filesystem remounted read-only or (rootless, where it is
the scratch tmpfs) to a 4 MB size (no write at all, but its superblock is the template's); and
several writers in a row.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from conftest import ROOT, Runner, feature_ok, need

SUITE = """
import ctypes, json, os, pytest

LOG = {log!r}
WRITES = ["tmp-file", "tmp-mode", "created-and-removed", "top-level-name", "remount-ro", "remount-size"]
MS_RDONLY, MS_REMOUNT = 1, 32

def _seen():
    seen = []
    if os.path.exists("/tmp/isolate-template-mark"):
        seen.append("tmp-file")
    if os.stat("/tmp").st_mode & 0o7777 != 0o1777:
        seen.append("tmp-mode")
    if os.path.exists("/isolate-template-mark"):
        seen.append("top-level-name")
    if any(os.statvfs(path).f_flag & os.ST_RDONLY for path in ("/", "/tmp")):
        seen.append("remount-ro")
    fs = os.statvfs("/tmp")  # an overlay reports its upper layer's filesystem: the scratch tmpfs
    if fs.f_blocks * fs.f_frsize < 16 << 20:
        seen.append("remount-size")
    return seen

def _write(kind):
    if kind == "tmp-file":
        open("/tmp/isolate-template-mark", "w").close()
    elif kind == "tmp-mode":
        os.chmod("/tmp", 0o700)
    elif kind == "created-and-removed":
        os.mkdir("/tmp/isolate-template-gone")
        os.rmdir("/tmp/isolate-template-gone")
    elif kind == "top-level-name":
        try:  # rootless the root directory of the tree is ours (a directory of the scratch tmpfs)
            open("/isolate-template-mark", "w").close()
        except PermissionError:
            kind = "nothing"
    elif kind == "remount-ro":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(None, b"/", None, MS_REMOUNT | MS_RDONLY, None) != 0:
            raise OSError(ctypes.get_errno(), "mount -o remount,ro /")
        assert os.statvfs("/").f_flag & os.ST_RDONLY
    elif kind == "remount-size":
        libc = ctypes.CDLL(None, use_errno=True)
        # rootless "/" is a directory of the scratch tmpfs; as root an overlay, which ignores it
        if libc.mount(None, b"/", None, MS_REMOUNT, b"size=4m") != 0 or "remount-size" not in _seen():
            kind = "nothing"
    return kind

# each write followed by a reader; then writers in a row (the factory stops making templates for
# them, see factory._template) and readers again
STEPS = ["read"] * 3 + [w for write in WRITES for w in (write, "read")] + ["tmp-file"] * 4 + ["read"] * 3

@pytest.mark.isolated(writable=[os.path.dirname(LOG)])
@pytest.mark.parametrize("index", range(len(STEPS)))
def test_step(index):
    seen = _seen()
    did = _write(STEPS[index]) if STEPS[index] != "read" else "nothing"
    with open(LOG, "a") as f:
        top = os.stat("/")
        root = [top.st_dev, top.st_ctime_ns, os.statvfs("/").f_fsid]
        f.write(json.dumps({{"index": index, "root": root, "seen": seen, "did": did}}) + "\\n")
"""


@pytest.mark.parametrize("holder", ["native", "forked"])
def test_a_written_root_is_never_given_to_another_test(pytester: pytest.Pytester, run: Runner,
                                                       host_caps: dict[str, Any], holder: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rootless, both holders of a sandbox made from a template: the native one (x86_64), and a
    fork of the factory (elsewhere; forced here); as root the factory copies templates itself
    (the holder does not matter)."""
    if holder == "forked":
        monkeypatch.setenv("PYTEST_ISOLATE_NATIVE_HOLDER", "0")
    (pytester.path / "log").mkdir()
    log = pytester.path / "log" / "steps.jsonl"
    pytester.makepyfile(SUITE.format(log=str(log)))
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=22)
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["index"] for s in steps] == list(range(22))
    assert all(s["seen"] == [] for s in steps), steps  # no test saw another's writes
    for i, writer in enumerate(steps):
        if writer["did"] != "nothing":
            later = [s["index"] for s in steps[i + 1:] if s["root"] == writer["root"]]
            assert not later, f"tests {later} got the root test {i} wrote into: {steps}"
    if (ROOT or feature_ok(host_caps, "tmpfs upper layer")) and os.environ.get("PYTEST_ISOLATE_TINYINIT") != "0":
        # templates are for upper layers in memory: before Linux 6.6 rootless ones go to disk
        clean = [tuple(s["root"]) for s in steps if s["did"] == "nothing"]
        need(len(set(clean)) < len(clean), "template roots (tinyinit; rootless: ambient capabilities)")


def test_templates_kept_are_bounded(pytester: pytest.Pytester, run: Runner) -> None:
    """Every distinct root (here: a different ``writable`` directory per test) gets templates of
    its own; the factory keeps a bounded number of them (8, each with 3 descriptors)."""
    dirs = []
    for i in range(14):
        (pytester.path / f"w{i}").mkdir()
        dirs.append(str(pytester.path / f"w{i}"))
    pytester.makeconftest("""
        import psutil

        def pytest_sessionfinish(session):
            for child in psutil.Process().children():
                try:
                    if "pytest_isolate.engine.factory" in " ".join(child.cmdline()):
                        with open("factory-fds", "w") as f:
                            f.write(str(child.num_fds()))
                except psutil.Error:  # a test's process exited, not yet reaped
                    pass
    """)
    tests = "".join(f"@pytest.mark.isolated(writable=[{d!r}])\n@pytest.mark.parametrize('again', [1, 2])\n"
                    f"def test_{i}(again):\n    pass\n\n" for i, d in enumerate(dirs))
    pytester.makepyfile("import pytest\n\n" + tests)
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=28)
    fds = int((pytester.path / "factory-fds").read_text())
    assert fds < 100, fds
