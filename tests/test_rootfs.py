"""The copy-on-write root: every write vanishes, except tmp_path and ``writable`` paths."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, Runner, need


def test_writes_vanish_tmp_path_and_writable_persist(pytester: pytest.Pytester, run: Runner, tmp_path_factory: pytest.TempPathFactory) -> None:
    token = uuid.uuid4().hex
    shared = tmp_path_factory.mktemp("shared")
    os.chmod(shared, 0o777)
    pytester.makepyfile(
        f"""
        import os, pytest
        TOKEN = "{token}"

        @pytest.mark.isolated
        def test_write_everywhere(tmp_path):
            with open("/etc/isolate-" + TOKEN, "w") as f:   # new file in an overlay root: works rootless too
                f.write("x")
            os.makedirs("/tmp/isolate-" + TOKEN + "/deep/er")
            with open("/tmp/isolate-" + TOKEN + "/deep/er/f", "w") as f:
                f.write("scratch")
            home = os.path.expanduser("~")
            os.makedirs(os.path.join(home, "isolate-" + TOKEN, "sub"))
            with open("/dev/shm/isolate-" + TOKEN, "w") as f:
                f.write("shared memory stays in the sandbox too")
            (tmp_path / "kept.txt").write_text("survives")
            with open(os.path.join({str(shared)!r}, "out.txt"), "w") as f:
                f.write("real")

        @pytest.mark.isolated(writable=[{str(shared)!r}])
        def test_writable(tmp_path):
            with open(os.path.join({str(shared)!r}, "writable.txt"), "w") as f:
                f.write("real")

        @pytest.mark.isolated
        def test_sees_host_files():
            assert os.path.exists("/etc/passwd") and os.path.isdir("/usr/lib")
        """
    )
    result = run("-v", "--basetemp", str(pytester.path / "bt"))
    result.assert_outcomes(passed=3)
    assert not os.path.exists(f"/etc/isolate-{token}")
    assert not os.path.exists(f"/tmp/isolate-{token}")
    assert not os.path.exists(f"/dev/shm/isolate-{token}")
    assert not os.path.exists(os.path.join(os.path.expanduser("~"), f"isolate-{token}"))
    assert not (shared / "out.txt").exists()
    assert (shared / "writable.txt").read_text() == "real"
    kept = {p.resolve() for p in (pytester.path / "bt").glob("*/kept.txt")}  # pytest adds a *current symlink
    assert [p.read_text() for p in kept] == ["survives"]


@pytest.mark.skipif(not ROOT, reason="root can write /usr and existing /etc files; rootless is tested below")
def test_root_writes_to_system_files_vanish(pytester: pytest.Pytester, run: Runner) -> None:
    token = uuid.uuid4().hex
    pytester.makepyfile(
        f"""
        import os, pytest

        @pytest.mark.isolated
        def test_overwrite():
            with open("/etc/hostname") as f:
                before = f.read()
            with open("/etc/hostname", "w") as f:
                f.write("clobbered")
            os.makedirs("/usr/share/isolate-{token}")
            os.remove("/etc/passwd")
        """
    )
    before = Path("/etc/passwd").read_text()
    run().assert_outcomes(passed=1)
    assert Path("/etc/passwd").read_text() == before
    assert not os.path.exists(f"/usr/share/isolate-{token}")


def _root_owned_world_writable() -> str:
    """A directory a rootless user may write but whose owner (root) the sandbox cannot map."""
    for path in ("/run/lock", "/tmp/.X11-unix", "/tmp/.ICE-unix", "/var/tmp/isolate-ci-sticky", "/tmp/isolate-ci-sticky"):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_uid == 0 and st.st_mode & 0o002 and not os.path.ismount(path):
            return path
    return ""


@pytest.mark.skipif(ROOT, reason="the unmapped-owner error exists only rootless")
def test_rootless_write_below_root_owned_dir_explains_why(pytester: pytest.Pytester, run: Runner) -> None:
    target = _root_owned_world_writable()
    need(bool(target), "a root-owned world-writable directory below an overlay root (e.g. /run/lock)")
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated
        def test_write_there():
            with open("{target}/isolate-test-file", "w") as f:
                f.write("x")
        """
    )
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Value too large*", "*not mapped in the rootless sandbox*writable=*"])


def test_root_user_namespace_forced(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.isolated(user_namespace=True)
        def test_in_userns():
            with open("/proc/self/uid_map") as f:
                line = f.read().split()
            # a new user namespace maps our own id (rootless) or the whole range (root) onto itself
            assert line[0] == line[1] == str(os.getuid())
        """
    )
    run().assert_outcomes(passed=1)
