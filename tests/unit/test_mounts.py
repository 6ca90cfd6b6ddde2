"""mountinfo parsing and the root plan, on fake trees (no mounts made)."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_isolate.linux.mounts import Mount, Step, parse_mountinfo, plan_root

MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
28 27 0:25 / /mnt/deep/data\040dir ro,nosuid shared:5 - tmpfs model ro
31 23 0:28 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
"""


def test_parse_mountinfo_unescapes_and_skips_optional_fields() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert Mount("/mnt/deep/data dir", "tmpfs") in mounts
    assert Mount("/sys/fs/cgroup", "cgroup2") in mounts
    assert len(mounts) == 7


def _tree(root: Path) -> None:
    for d in ("etc", "usr/lib", "mnt/deep/data dir", "mnt/deep/other", "mnt/plain", "proc", "sys", "dev/shm", "tmp", "home/u"):
        (root / d).mkdir(parents=True)
    (root / "vmlinuz").symlink_to("boot/vmlinuz-1")
    (root / "mnt/deep/file.txt").write_text("x")


def test_plan_overlays_subtrees_without_mounts_and_recurses_into_the_rest(tmp_path: Path) -> None:
    _tree(tmp_path)
    steps = plan_root(parse_mountinfo(MOUNTINFO), root=str(tmp_path))
    assert Step("proc", "/proc") in steps
    assert Step("rbind", "/sys") in steps and Step("rbind", "/dev") in steps
    assert Step("overlay", "/etc") in steps and Step("overlay", "/usr") in steps
    assert Step("dir", "/mnt") in steps and Step("dir", "/mnt/deep") in steps
    assert Step("overlay", "/mnt/deep/data dir") in steps  # a mount point without submounts
    assert Step("overlay", "/mnt/deep/other") in steps and Step("overlay", "/mnt/plain") in steps
    assert Step("file", "/mnt/deep/file.txt") in steps
    assert Step("symlink", "/vmlinuz", "boot/vmlinuz-1") in steps
    assert not any(s.path.startswith("/usr/") for s in steps)


def test_user_writable_dirs_get_their_own_overlay_after_their_parent(tmp_path: Path) -> None:
    _tree(tmp_path)
    steps = plan_root(parse_mountinfo(MOUNTINFO), ["/home/u", "/dev/shm", "/tmp", "/missing"], root=str(tmp_path))
    paths = [s.path for s in steps if s.action == "overlay"]
    assert paths.count("/tmp") == 1  # already an overlay root
    assert paths.index("/home") < paths.index("/home/u")
    assert "/dev/shm" in paths and "/missing" not in paths
    assert os.path.isdir(tmp_path / "home/u")


def test_root_plan_is_one_overlay_plus_one_per_mount(tmp_path: Path) -> None:
    from pytest_isolate.linux.mounts import plan_root_whole

    _tree(tmp_path)
    steps = plan_root_whole(parse_mountinfo(MOUNTINFO), root=str(tmp_path))
    assert steps[0] == Step("rootlayer", "/")
    assert Step("proc", "/proc") in steps and Step("rbind", "/proc") not in steps
    assert Step("rbind", "/dev") in steps and Step("rbind", "/sys") in steps
    assert Step("overlay", "/mnt/deep/data dir") in steps
    assert not any(s.path.startswith("/sys/") or s.path == "/etc" for s in steps)
    assert steps[-1] == Step("overlay", "/dev/shm")  # writes to /dev/shm stay in the sandbox
