"""Unit tests of the cgroup layer on FAKE cgroup trees (no kernel cgroup is touched).

``FakeFs`` plays the kernel: a new directory gets the interface files of its controllers,
``cgroup.procs`` migrates a pid, ``cgroup.subtree_control`` enforces v2's "no internal
processes" rule, ``rmdir`` refuses a populated cgroup.  Parsers get realistic file contents.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import threading
from pathlib import Path
from typing import Optional

import pytest

from pytest_isolate.linux import cgroups as cg
from pytest_isolate.linux import cgroups_v1 as v1
from pytest_isolate.linux import cgroups_v2 as v2
from pytest_isolate.linux import systemd
from pytest_isolate.linux.cgroups import CgroupError, Limits, Usage

ME = os.getpid()
MY_START = 4242


class FakeFs(cg.CgroupFs):
    """A cgroupfs made of plain files under ``root`` that behaves like the kernel's."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = str(root)
        self.kind = kind
        self.starts: dict[int, int] = {ME: MY_START}
        self.killed: list[tuple[int, int]] = []
        self.writes: list[tuple[str, str]] = []
        self.readonly: set[str] = set()
        self.fail: dict[str, int] = {}
        self.busy_once: set[str] = set()
        self.kill_file = True
        self.peak_file = True
        self.ro_mount = False

    # -- the seam
    def start_time(self, pid: int) -> Optional[int]:
        return self.starts.get(pid)

    def writable(self, path: str) -> bool:
        return not any(path == r or path.startswith(r + "/") for r in self.readonly)

    def read_only(self, path: str) -> bool:
        return self.ro_mount

    def sleep(self, seconds: float) -> None:
        pass

    def kill(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))
        self._drop(pid)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        for name, text in self._files_for(path).items():
            Path(path, name).write_text(text)

    def rmdir(self, path: str) -> None:
        if path in self.busy_once:
            self.busy_once.discard(path)
            raise OSError(errno.EBUSY, "Device or resource busy")
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if _procs(path) or any(os.path.isdir(os.path.join(path, n)) for n in os.listdir(path)):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)

    def write(self, path: str, value: str) -> None:
        self.writes.append((path, value))
        name, directory = os.path.basename(path), os.path.dirname(path)
        if name in self.fail:
            raise OSError(self.fail[name], os.strerror(self.fail[name]), path)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        handler = {"cgroup.procs": self._migrate, "cgroup.subtree_control": self._control, "cgroup.kill": self._kill_all}
        handler.get(name, lambda d, v: Path(path).write_text(v))(directory, value)

    # -- kernel behaviour
    def _migrate(self, directory: str, value: str) -> None:
        pid = int(value) or ME
        if self.kind == "v2" and directory != self.root and _words(directory, "cgroup.subtree_control"):
            raise OSError(errno.EBUSY, "no internal processes", directory)
        self._drop(pid)
        Path(directory, "cgroup.procs").write_text("".join(f"{p}\n" for p in _procs(directory) + [pid]))

    def _control(self, directory: str, value: str) -> None:
        enabled = _words(directory, "cgroup.subtree_control")
        for token in value.split():
            controller = token[1:]
            if controller not in _words(directory, "cgroup.controllers"):
                raise OSError(errno.ENOENT, "No such file or directory")
            threaded_root = _procs(directory) and set(enabled) & {"cpu", "pids"}
            if token[0] == "+" and controller in ("memory", "io") and threaded_root:
                raise OSError(errno.EOPNOTSUPP, "thread root: no domain controllers")
            if token[0] == "+" and controller in ("memory", "io") and _procs(directory) and directory != self.root:
                raise OSError(errno.EBUSY, "Device or resource busy")
            enabled = enabled + [controller] if token[0] == "+" else [c for c in enabled if c != controller]
        Path(directory, "cgroup.subtree_control").write_text(" ".join(sorted(set(enabled))) + "\n")
        for child in os.listdir(directory):
            if os.path.isdir(os.path.join(directory, child)):
                Path(directory, child, "cgroup.controllers").write_text(" ".join(sorted(set(enabled))) + "\n")

    def _kill_all(self, directory: str, value: str) -> None:
        for sub in cg.subtree(self, directory):
            for pid in _procs(sub):
                self.kill(pid, signal.SIGKILL)

    def _drop(self, pid: int) -> None:
        for dirpath, _, names in os.walk(self.root):
            if "cgroup.procs" in names:
                left = [p for p in _procs(dirpath) if p != pid]
                Path(dirpath, "cgroup.procs").write_text("".join(f"{p}\n" for p in left))

    def _files_for(self, path: str) -> dict[str, str]:
        if self.kind == "v2":
            return self._v2_files(_words(os.path.dirname(path), "cgroup.subtree_control"))
        hierarchy = os.path.relpath(path, self.root).split(os.sep)[0]
        return _v1_files(hierarchy.split(","))

    def _v2_files(self, controllers: list[str]) -> dict[str, str]:
        files = {"cgroup.procs": "", "cgroup.controllers": " ".join(controllers), "cgroup.subtree_control": ""}
        files.update({"cgroup.type": "domain\n", "cgroup.freeze": "0\n", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"})
        if self.kill_file:
            files["cgroup.kill"] = ""
        if "memory" in controllers:
            files.update({"memory.max": "max\n", "memory.swap.max": "max\n", "memory.oom.group": "0\n", "memory.current": "0\n"})
            files["memory.events"] = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"
            if self.peak_file:
                files["memory.peak"] = "0\n"
        if "cpu" in controllers:
            files["cpu.max"] = "max 100000\n"
        if "pids" in controllers:
            files.update({"pids.max": "max\n", "pids.peak": "0\n"})
        if "io" in controllers:
            files["io.stat"] = ""
        return files


def _v1_files(controllers: list[str]) -> dict[str, str]:
    files = {"cgroup.procs": "", "tasks": "", "notify_on_release": "0\n"}
    per = {
        "memory": {"memory.limit_in_bytes": "9223372036854771712\n", "memory.memsw.limit_in_bytes": "9223372036854771712\n",
                   "memory.max_usage_in_bytes": "0\n", "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"},
        "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n", "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n"},
        "cpuacct": {"cpuacct.usage_user": "0\n", "cpuacct.usage_sys": "0\n", "cpuacct.stat": "user 0\nsystem 0\n"},
        "pids": {"pids.max": "max\n", "pids.peak": "0\n"},
        "blkio": {"blkio.throttle.io_service_bytes": "Total 0\n"},
        "freezer": {"freezer.state": "THAWED\n"},
        "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n"},
    }
    for controller in controllers:
        files.update(per.get(controller, {}))
    return files


def _procs(directory: str) -> list[int]:
    path = os.path.join(directory, "cgroup.procs")
    return cg.parse_pids(Path(path).read_text()) if os.path.exists(path) else []


def _words(directory: str, name: str) -> list[str]:
    path = os.path.join(directory, name)
    return Path(path).read_text().split() if os.path.exists(path) else []


def _tree(base: Path) -> list[str]:
    """Every directory below ``base``, relative, for before/after comparisons."""
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_dir())


# ---------------------------------------------------------------- fake trees


@pytest.fixture
def v2tree(tmp_path: Path) -> tuple[FakeFs, Path, Path]:
    """A v2 root with the job's cgroup ``system.slice/job.service`` holding only us."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    (root / "cgroup.procs").write_text("1\n")  # the root cgroup has no cgroup.type
    fs = FakeFs(root, "v2")
    fs.mkdir(str(root / "system.slice"))
    fs.write(str(root / "system.slice" / "cgroup.subtree_control"), "+cpu +io +memory +pids")
    fs.mkdir(str(root / "system.slice" / "job.service"))
    (root / "system.slice" / "job.service" / "cgroup.procs").write_text(f"{ME}\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/system.slice/job.service\n")
    return fs, root, proc


def _v2(fs: FakeFs, root: Path, proc: Path, **kw: object) -> v2.V2Driver:
    driver = cg.detect(str(root), str(proc), mountinfo=str(root / "no-mountinfo"), fs=fs)
    assert isinstance(driver, v2.V2Driver)
    for name, value in kw.items():
        setattr(driver, name, value)
    return driver


@pytest.fixture
def v1tree(tmp_path: Path) -> tuple[FakeFs, Path, Path]:
    """A hybrid-like v1 root: separate memory/pids/blkio/freezer, co-mounted cpu,cpuacct."""
    root = tmp_path / "cgroup"
    root.mkdir()
    fs = FakeFs(root, "v1")
    for hierarchy in ("memory", "cpu,cpuacct", "pids", "blkio", "freezer"):
        (root / hierarchy).mkdir()
        (root / hierarchy / "cgroup.procs").write_text(f"1\n{ME}\n")
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.controllers").write_text("")
    (root / "unified" / "cgroup.procs").write_text("")
    fs.mkdir(str(root / "memory" / "process_api"))
    fs.mkdir(str(root / "memory" / "process_api" / "abc"))
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n")
    return fs, root, proc


# ---------------------------------------------------------------- parsers

IO_STAT = (
    "259:0 rbytes=1048576 wbytes=4096 rios=12 wios=1 dbytes=0 dios=0\n"
    "8:16 rbytes=512 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
)
CPU_STAT_THROTTLED = (
    "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\ncore_sched.force_idle_usec 0\n"
    "nr_periods 20\nnr_throttled 5\nthrottled_usec 250000\nnr_bursts 0\nburst_usec 0\n"
)
CPU_STAT_PLAIN = "usage_usec 300\nuser_usec 200\nsystem_usec 100\n"
MEMORY_EVENTS = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 1\n"
OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
BLKIO = "8:0 Read 4096\n8:0 Write 1024\n8:0 Sync 5120\n8:0 Async 0\n8:0 Discard 0\n8:0 Total 5120\n" \
        "8:16 Read 100\n8:16 Write 0\n8:16 Sync 100\n8:16 Async 0\n8:16 Discard 0\n8:16 Total 100\nTotal 5220\n"
MOUNTINFO_HYBRID = (
    "23 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
MOUNTINFO_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_parse_proc_cgroup_hybrid_and_v2() -> None:
    parsed = cg.parse_proc_cgroup("4:memory:/process_api/abc\n2:cpu,cpuacct:/\n1:name=systemd:/x\n0::/user.slice\n")
    assert parsed == {"memory": "/process_api/abc", "cpu": "/", "cpuacct": "/", "name=systemd": "/x", "": "/user.slice"}
    assert cg.parse_proc_cgroup("0::/system.slice/job.service\n") == {"": "/system.slice/job.service"}


def test_parse_io_stat_sums_devices() -> None:
    assert v2.parse_io_stat(IO_STAT) == (1048576 + 512, 4096 + 8192)
    assert v2.parse_io_stat("") == (0, 0)


def test_v2_usage_with_throttling() -> None:
    texts = {"memory.peak": "104857600\n", "memory.events": MEMORY_EVENTS, "cpu.stat": CPU_STAT_THROTTLED,
             "pids.peak": "7\n", "io.stat": IO_STAT}
    usage = v2.usage_from_files(texts)
    assert usage == Usage(104857600, 1.0, 0.5, 7, 1049088, 12288, 1, 0.25)
    assert usage.source == "cgroup" and not usage.estimated


def test_v2_usage_without_cpu_controller_or_newer_files() -> None:
    usage = v2.usage_from_files({"cpu.stat": CPU_STAT_PLAIN, "memory.current": "4096\n"}, sampled_peak=8192)
    assert (usage.cpu_user, usage.cpu_system, usage.cpu_throttled) == (0.0002, 0.0001, None)
    assert (usage.pids_peak, usage.io_read_bytes, usage.oom_kills) == (None, None, None)
    assert usage.memory_peak == 8192 and usage.estimated == {"memory_peak"}


def test_v1_usage_prefers_nanosecond_cpu_counters() -> None:
    texts = {"memory.max_usage_in_bytes": "3145728\n", "memory.oom_control": OOM_CONTROL, "cpuacct.usage_user": "2000000000\n",
             "cpuacct.usage_sys": "500000000\n", "cpuacct.stat": "user 1\nsystem 1\n", "pids.peak": "3\n",
             "blkio.throttle.io_service_bytes": BLKIO, "cpu.stat": "nr_periods 3\nnr_throttled 1\nthrottled_time 1500000000\n"}
    assert v1.usage_from_files(texts) == Usage(3145728, 2.0, 0.5, 3, 4196, 1024, 3, 1.5)


def test_v1_cpu_total_is_cpuacct_usage_split_by_the_sampled_ratio() -> None:
    """On a busy host cpuacct.usage_user undercounts (0.78 s for 1.00 s of user-mode work, measured):
    the precise total cpuacct.usage is divided in the sampled user/system proportions."""
    texts = {"cpuacct.usage": "1003653767\n", "cpuacct.usage_user": "780000000\n", "cpuacct.usage_sys": "0\n"}
    assert v1.cpu_times(texts, 100) == (1.003653767, 0.0)
    texts = {"cpuacct.usage": "1000000000\n", "cpuacct.usage_user": "600000000\n", "cpuacct.usage_sys": "200000000\n"}
    user, system = v1.cpu_times(texts, 100)
    assert (round(user or 0, 6), round(system or 0, 6)) == (0.75, 0.25)
    # nothing sampled yet in ns: the tick counts give the ratio; no ticks either: all user time
    texts = {"cpuacct.usage": "3000000\n", "cpuacct.usage_user": "0\n", "cpuacct.usage_sys": "0\n", "cpuacct.stat": "user 1\nsystem 1\n"}
    assert v1.cpu_times(texts, 100) == (0.0015, 0.0015)
    assert v1.cpu_times({"cpuacct.usage": "3000000\n", "cpuacct.usage_user": "0\n", "cpuacct.usage_sys": "0\n"}, 100) == (0.003, 0.0)


def test_v1_usage_falls_back_to_cpuacct_stat_ticks() -> None:
    usage = v1.usage_from_files({"cpuacct.stat": "user 250\nsystem 50\n"}, ticks_per_second=100)
    assert (usage.cpu_user, usage.cpu_system) == (2.5, 0.5)
    assert (usage.memory_peak, usage.io_read_bytes, usage.oom_kills, usage.pids_peak) == (None, None, None, None)


def test_blkio_skips_total_and_other_operations() -> None:
    assert v1.parse_blkio_bytes(BLKIO) == (4196, 1024)
    assert v1.parse_blkio_bytes("Total 0\n") == (0, 0)


def test_parse_keyed_and_int() -> None:
    assert cg.parse_keyed(OOM_CONTROL) == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}
    assert cg.parse_int("max\n") is None and cg.parse_int(None) is None and cg.parse_int("12\n") == 12


def test_parse_mount_fstype() -> None:
    assert cg.parse_mount_fstype(MOUNTINFO_HYBRID, "/sys/fs/cgroup") == "tmpfs"
    assert cg.parse_mount_fstype(MOUNTINFO_HYBRID, "/sys/fs/cgroup/unified") == "cgroup2"
    assert cg.parse_mount_fstype(MOUNTINFO_V2, "/sys/fs/cgroup") == "cgroup2"
    assert cg.parse_mount_fstype("1 0 0:1 / /a\\040b rw - tmpfs x rw\n", "/a b") == "tmpfs"
    assert cg.parse_mount_fstype(MOUNTINFO_V2, "/elsewhere") is None


def test_parse_stat_start_time_survives_odd_command_names() -> None:
    fields = " ".join(str(n) for n in range(3, 53))
    assert cg.parse_stat_start_time(f"123 (a b) c) {fields}") == 22


def test_session_names() -> None:
    assert cg.parse_session_name("pytest-isolate-12-345") == (12, 345)
    assert cg.parse_session_name("pytest-isolate-12-345.2") == (12, 345)
    assert cg.parse_session_name("pytest-isolate-supervisor") is None
    assert cg.parse_session_name("t-1") is None


def test_limits_validation_and_quota() -> None:
    with pytest.raises(CgroupError, match="memory limit must be a positive"):
        Limits(memory=0).check()
    with pytest.raises(CgroupError, match="pids limit"):
        Limits(pids=0).check()
    assert Limits(memory=1, cpus=0.5).needs() == {"memory": "memory", "cpus": "cpu"}
    assert cg.cpu_quota_us(0.5) == 50000 and cg.cpu_quota_us(0.001) == 1000


# ---------------------------------------------------------------- detection


def test_detect_v2_by_shape(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    assert _v2(fs, root, proc).name == "v2"


def test_detect_v1_by_shape_resolves_symlinked_hierarchies(v1tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v1tree
    driver = cg.detect(str(root), str(proc), mountinfo=str(root / "none"), fs=fs)
    assert isinstance(driver, v1.V1Driver)
    own = driver.own_cgroups()
    assert own["memory"] == str(root / "memory" / "process_api" / "abc")
    assert own["cpu"] == own["cpuacct"] == str(root / "cpu,cpuacct")
    assert set(own) == {"memory", "cpu", "cpuacct", "pids", "blkio", "freezer"}


def test_detect_uses_mount_type_when_root_is_a_mount(tmp_path: Path, v1tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v1tree
    info = tmp_path / "mountinfo"
    info.write_text(f"30 23 0:26 / {root} rw - cgroup2 cgroup2 rw\n")
    assert cg.detect(str(root), str(proc), mountinfo=str(info), fs=fs).name == "v2"
    info.write_text(f"30 23 0:26 / {root} rw - tmpfs tmpfs rw\n")
    assert cg.detect(str(root), str(proc), mountinfo=str(info), fs=fs).name == "v1"
    info.write_text(f"30 23 0:26 / {root} rw - ext4 /dev/vda rw\n")
    assert cg.detect(str(root), str(proc), mountinfo=str(info), fs=fs).name == "none"


def test_detect_none_refuses_with_the_fix(tmp_path: Path) -> None:
    driver = cg.detect(str(tmp_path / "missing"), str(tmp_path / "p"), mountinfo=str(tmp_path / "m"))
    ok, reason = driver.available()
    assert driver.name == "none" and not ok
    assert "no cgroup filesystem" in reason and "mount -t cgroup2" in reason
    with pytest.raises(CgroupError, match="no cgroup filesystem"):
        driver.open_session()


# ---------------------------------------------------------------- v2 driver


def test_v2_session_moves_processes_out_and_restores(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    before = _tree(root)
    job = root / "system.slice" / "job.service"
    session = _v2(fs, root, proc).open_session()
    assert _procs(str(job / "pytest-isolate-supervisor")) == [ME]
    assert _words(str(job), "cgroup.subtree_control") == ["cpu", "io", "memory", "pids"]
    assert session.controllers == {"memory", "cpu", "pids", "io"}
    assert os.path.basename(session.path) == f"pytest-isolate-{ME}-{MY_START}"
    session.remove()
    assert _tree(root) == before and _procs(str(job)) == [ME]
    assert _words(str(job), "cgroup.subtree_control") == []


def test_v2_enables_missing_controllers_in_ancestors(v2tree: tuple[FakeFs, Path, Path]) -> None:
    """systemd gave the job's slice only memory and pids; as root we enable the rest."""
    fs, root, proc = v2tree
    fs.write(str(root / "system.slice" / "cgroup.subtree_control"), "-cpu -io")
    assert _words(str(root / "system.slice" / "job.service"), "cgroup.controllers") == ["memory", "pids"]
    session = _v2(fs, root, proc).open_session()
    assert session.controllers == {"memory", "cpu", "pids", "io"}
    session.remove()


def test_v2_leaf_limits(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    session = _v2(fs, root, proc).open_session()
    leaf = session.new_leaf(Limits(memory=256 << 20, cpus=1.5, pids=64))
    files = {n: Path(leaf.path, n).read_text() for n in ("memory.max", "memory.swap.max", "memory.oom.group", "cpu.max", "pids.max")}
    assert files == {"memory.max": str(256 << 20), "memory.swap.max": "0", "memory.oom.group": "1",
                     "cpu.max": "150000 100000", "pids.max": "64"}
    assert leaf.procs_files() == (os.path.join(leaf.path, "cgroup.procs"),)
    assert os.path.basename(leaf.path) == "t-1"
    session.remove()
    assert not os.path.exists(leaf.path)


def test_v2_leaf_usage_and_sampled_peak(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    fs.peak_file = False
    leaf = _v2(fs, root, proc).open_session().new_leaf(Limits())
    Path(leaf.path, "cpu.stat").write_text(CPU_STAT_THROTTLED)
    Path(leaf.path, "io.stat").write_text(IO_STAT)
    Path(leaf.path, "memory.current").write_text("5000\n")
    assert leaf.usage().memory_peak == 5000
    Path(leaf.path, "memory.current").write_text("100\n")
    usage = leaf.usage()
    assert usage.memory_peak == 5000 and usage.estimated == {"memory_peak"}
    assert (usage.cpu_user, usage.io_write_bytes, usage.cpu_throttled) == (1.0, 12288, 0.25)


def test_v2_shared_cgroup_keeps_supervisor_until_last_session(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    job = root / "system.slice" / "job.service"
    Path(job, "cgroup.procs").write_text(f"{ME}\n777\n")  # e.g. the xdist controller
    first = _v2(fs, root, proc).open_session()
    assert _procs(str(job / "pytest-isolate-supervisor")) == sorted([ME, 777])
    proc.write_text("0::/system.slice/job.service/pytest-isolate-supervisor\n")
    second_driver = _v2(fs, root, proc)
    assert second_driver.own_cgroup() == str(job)
    second = second_driver.open_session()
    assert second.path.endswith(".2")
    first.remove()
    assert (job / "pytest-isolate-supervisor").is_dir()
    second.remove()
    assert not (job / "pytest-isolate-supervisor").exists()
    assert _procs(str(job)) == sorted([ME, 777])


def test_v2_stale_sessions_are_killed_and_removed(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    job = root / "system.slice" / "job.service"
    fs.starts[555] = 9
    for name in ("pytest-isolate-999-5", "pytest-isolate-555-9", "pytest-isolate-555-8"):
        (job / name / "t-1").mkdir(parents=True)
        (job / name / "cgroup.procs").write_text("")
        (job / name / "t-1" / "cgroup.procs").write_text("777\n" if name.endswith("999-5") else "")
    session = _v2(fs, root, proc).open_session()
    assert (777, signal.SIGKILL) in fs.killed
    assert not (job / "pytest-isolate-999-5").exists() and not (job / "pytest-isolate-555-8").exists()
    assert (job / "pytest-isolate-555-9").exists()  # pid 555 with that start time still runs
    session.remove()


@pytest.mark.parametrize("kill_file", [True, False], ids=["cgroup.kill", "freeze"])
def test_v2_kill(v2tree: tuple[FakeFs, Path, Path], kill_file: bool) -> None:
    fs, root, proc = v2tree
    fs.kill_file = kill_file
    leaf = _v2(fs, root, proc).open_session().new_leaf(Limits())
    Path(leaf.path, "cgroup.procs").write_text("101\n102\n")
    os.mkdir(os.path.join(leaf.path, "nested"))
    Path(leaf.path, "nested", "cgroup.procs").write_text("103\n")
    assert leaf.pids() == [101, 102, 103]
    leaf.kill()
    assert leaf.pids() == [] and {pid for pid, _ in fs.killed} == {101, 102, 103}
    freezes = [v for p, v in fs.writes if p.endswith("cgroup.freeze")]
    assert freezes == ([] if kill_file else ["1", "0"])
    leaf.remove()
    assert not os.path.exists(leaf.path)
    leaf.remove()  # already gone: fine


def test_v2_remove_retries_ebusy(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    leaf = _v2(fs, root, proc).open_session().new_leaf(Limits())
    fs.busy_once.add(leaf.path)
    leaf.remove()
    assert not os.path.exists(leaf.path)


def test_v2_missing_controller_names_the_fix(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    fs.write(str(root / "system.slice" / "cgroup.subtree_control"), "-cpu")
    fs.readonly.add(str(root / "system.slice" / "cgroup.subtree_control"))  # not ours (rootless)
    session = _v2(fs, root, proc).open_session()
    assert session.controllers == {"memory", "pids", "io"}
    with pytest.raises(CgroupError, match=r"cpus limit: the cgroup 'cpu' controller.*Delegate=cpu"):
        session.new_leaf(Limits(cpus=1))
    assert session.new_leaf(Limits(memory=1 << 20)).path.endswith("t-1")
    session.remove()


def test_v2_failed_limit_removes_the_leaf(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    session = _v2(fs, root, proc).open_session()
    fs.fail["pids.max"] = errno.EINVAL
    with pytest.raises(CgroupError, match=r"cannot write '8' to .*t-1/pids.max: Invalid argument"):
        session.new_leaf(Limits(pids=8))
    assert not os.path.exists(os.path.join(session.path, "t-1"))
    session.remove()


def test_v2_root_in_a_shared_service_cgroup_takes_a_system_scope(v2tree: tuple[FakeFs, Path, Path]) -> None:
    """Root whose cgroup also holds the CI job's other processes asks the system manager for a
    delegated scope instead of moving them (an OOM below the service would stop the whole job)."""
    fs, root, proc = v2tree
    (root / "system.slice" / "job.service" / "cgroup.procs").write_text(f"{ME}\n4242\n")
    scope = "/system.slice/pytest-isolate-1-ab.scope"
    asked: list[str] = []

    def start(proc_self_cgroup: str) -> str:
        asked.append(proc_self_cgroup)
        fs.mkdir(str(root / scope[1:]))
        fs.write(str(root / scope[1:] / "cgroup.procs"), str(ME))
        (root / "system.slice" / "job.service" / "cgroup.procs").write_text("4242\n")
        Path(proc_self_cgroup).write_text(f"0::{scope}\n")
        return scope

    driver = _v2(fs, root, proc, system_scope_starter=start)
    driver.euid = 0
    assert driver.available()[0]
    session = driver.open_session()
    assert asked and session.path.startswith(f"{root}{scope}/pytest-isolate-")
    assert (root / "system.slice" / "job.service" / "cgroup.procs").read_text() == "4242\n"  # left alone
    session.remove()


def test_v2_root_alone_in_its_cgroup_needs_no_scope(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree

    def start(proc_self_cgroup: str) -> str:
        raise AssertionError("no scope needed: pytest is alone in its cgroup")

    driver = _v2(fs, root, proc, system_scope_starter=start)
    driver.euid = 0
    assert driver.available()[0]
    driver.open_session().remove()


def test_v2_root_without_systemd_moves_the_others(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    (root / "system.slice" / "job.service" / "cgroup.procs").write_text(f"{ME}\n4242\n")

    def no_manager(proc_self_cgroup: str) -> str:
        raise CgroupError("no systemd system manager")

    driver = _v2(fs, root, proc, system_scope_starter=no_manager)
    driver.euid = 0
    assert driver.available()[0]
    session = driver.open_session()
    assert session.path.startswith(str(root / "system.slice" / "job.service" / "pytest-isolate-"))
    session.remove()


def test_v2_rootless_without_delegation_or_systemd(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    fs.readonly.add(str(root / "system.slice" / "job.service"))

    def no_manager(proc_self_cgroup: str) -> str:
        raise CgroupError("no systemd user manager for uid 1001 (/run/user/1001/systemd/private does not exist)")

    driver = _v2(fs, root, proc, scope_starter=no_manager)
    driver.euid = 1001
    ok, reason = driver.available()
    assert not ok
    assert "not delegated to uid 1001" in reason and "no systemd user manager" in reason
    assert "systemd-run --user --scope -p Delegate=yes" in reason and "loginctl enable-linger" in reason
    with pytest.raises(CgroupError, match="not delegated"):
        driver.open_session()


def test_v2_rootless_gets_a_delegated_scope(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    fs.readonly.add(str(root / "system.slice" / "job.service"))
    scope = "/user.slice/user@1001.service/app.slice/pytest-isolate-1-ab.scope"

    def start(proc_self_cgroup: str) -> str:
        for part in ("user.slice", "user.slice/user@1001.service", "user.slice/user@1001.service/app.slice", scope[1:]):
            fs.mkdir(str(root / part))
            if not part.endswith(".scope"):
                fs.write(str(root / part / "cgroup.subtree_control"), "+cpu +io +memory +pids")
        fs.write(str(root / scope[1:] / "cgroup.procs"), str(ME))
        Path(proc_self_cgroup).write_text(f"0::{scope}\n")
        return scope

    driver = _v2(fs, root, proc, scope_starter=start)
    driver.euid = 1001
    assert driver.available() == (True, f"cgroup v2 at {root}{scope} (delegated to uid 1001)")
    session = driver.open_session()
    assert session.path.startswith(f"{root}{scope}/pytest-isolate-")
    session.remove()


def test_v2_dead_sibling_scope_is_emptied(v2tree: tuple[FakeFs, Path, Path]) -> None:
    """Rootless, every session has its own systemd scope: a crashed one's leftovers live in
    a sibling scope, which systemd keeps while a process remains in it."""
    fs, root, proc = v2tree
    app = root / "system.slice"
    mine, dead = f"pytest-isolate-{ME}-{MY_START}.scope", "pytest-isolate-999-7.scope"
    for scope in (mine, dead):
        fs.mkdir(str(app / scope))
    fs.write(str(app / mine / "cgroup.procs"), str(ME))
    fs.mkdir(str(app / dead / "pytest-isolate-999-7"))
    fs.mkdir(str(app / dead / "pytest-isolate-999-7" / "t-1"))
    (app / dead / "pytest-isolate-999-7" / "t-1" / "cgroup.procs").write_text("321\n")
    proc.write_text(f"0::/system.slice/{mine}\n")
    session = _v2(fs, root, proc).open_session()
    assert (321, signal.SIGKILL) in fs.killed
    assert os.listdir(app / dead) and not (app / dead / "pytest-isolate-999-7").exists()
    session.remove()


def test_v2_read_only_cgroupfs(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    fs.readonly.add(str(root))
    fs.ro_mount = True
    ok, reason = _v2(fs, root, proc).available()
    assert not ok and "read-only" in reason and "--cgroupns=private" in reason


def test_v2_out_of_tree_cgroup(v2tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v2tree
    proc.write_text("0::/../../elsewhere\n")
    with pytest.raises(CgroupError, match="--cgroupns=private"):
        _v2(fs, root, proc).open_session()


# ---------------------------------------------------------------- v1 driver


def test_v1_session_leaf_limits_usage_and_cleanup(v1tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v1tree
    before = _tree(root)
    driver = cg.detect(str(root), str(proc), mountinfo=str(root / "none"), fs=fs)
    assert driver.available()[0]
    session = driver.open_session()
    assert session.controllers == {"memory", "cpu", "pids", "io"}
    leaf = session.new_leaf(Limits(memory=64 << 20, cpus=0.25, pids=10))
    assert leaf.path == str(root / "memory" / "process_api" / "abc" / f"pytest-isolate-{ME}-{MY_START}" / "t-1")
    # joined: memory, cpu+cpuacct (one co-mounted hierarchy), pids, blkio; never freezer (the init's
    # kill ends the sandbox) — each join is a migration on the critical path of a test
    assert len(leaf.procs_files()) == 4
    assert not any("/freezer/" in f for f in leaf.procs_files())
    read = {n: Path(d, n).read_text() for d in {os.path.dirname(f) for f in leaf.procs_files()} for n in os.listdir(d)}
    assert read["memory.limit_in_bytes"] == read["memory.memsw.limit_in_bytes"] == str(64 << 20)
    assert (read["cpu.cfs_period_us"], read["cpu.cfs_quota_us"], read["pids.max"]) == ("100000", "25000", "10")
    Path(os.path.dirname(leaf.procs_files()[0]), "blkio.throttle.io_service_bytes").write_text(BLKIO)
    assert (leaf.usage().io_read_bytes, leaf.usage().oom_kills) == (4196, 0)
    session.remove()
    assert _tree(root) == before


def test_v1_self_join_and_try_remove(v1tree: tuple[FakeFs, Path, Path]) -> None:
    """A payload joins a v1 leaf by writing 0 into ``tasks`` (no global lock, no RCU grace
    period); a leaf with a process still in it is kept by try_remove, and removed once empty."""
    fs, root, proc = v1tree
    session = cg.detect(str(root), str(proc), mountinfo=str(root / "none"), fs=fs).open_session()
    leaf = session.new_leaf(Limits(memory=64 << 20))
    joins = leaf.self_join_files()
    assert joins is not None
    assert [os.path.dirname(f) for f in joins] == [os.path.dirname(f) for f in leaf.procs_files()]
    assert all(f.endswith("/tasks") for f in joins)
    busy = str(root / "memory")
    real_rmdir = fs.rmdir

    def rmdir(path: str) -> None:
        if path.startswith(busy):
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_rmdir(path)

    fs.rmdir = rmdir  # type: ignore[method-assign]
    assert leaf.try_remove() is False
    fs.rmdir = real_rmdir  # type: ignore[method-assign]
    assert leaf.try_remove() is True
    assert leaf.try_remove() is True  # already gone is fine
    session.remove()


def test_v1_usage_files_are_opened_with_the_leaf_and_read_fresh(v1tree: tuple[FakeFs, Path, Path]) -> None:
    """The usage files are opened when the leaf is made (ahead of its test) and re-read from
    offset 0 each time; removing the leaf closes them, and a usage read then finds nothing."""
    fs, root, proc = v1tree
    session = cg.detect(str(root), str(proc), mountinfo=str(root / "none"), fs=fs).open_session()
    leaf = session.new_leaf(Limits())
    assert isinstance(leaf, v1.V1Leaf)
    opened = [fd for fd in leaf.opened.fds.values() if fd is not None]
    assert len(opened) >= 4
    memory = Path(leaf.dirs["memory"])
    (memory / "memory.max_usage_in_bytes").write_text("3145728\n")
    assert leaf.usage().memory_peak == 3145728
    (memory / "memory.max_usage_in_bytes").write_text("4194304\n")  # longer than before, then shorter
    assert leaf.usage().memory_peak == 4194304
    (memory / "memory.max_usage_in_bytes").write_text("7\n")
    assert leaf.usage().memory_peak == 7
    assert leaf.try_remove() is True
    assert leaf.opened.fds == {}
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert leaf.usage().memory_peak is None
    session.remove()


def test_open_files_stands_aside_when_files_cannot_be_held(v1tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, _ = v1tree

    def out_of_fds(path: str) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    fs.open_read = out_of_fds  # type: ignore[method-assign]
    held = cg.OpenFiles(fs)
    held.open([str(root / "memory" / "cgroup.procs")])
    assert held.fds == {}
    del fs.open_read  # fds to spare again
    assert held.read(str(root / "memory"), ["cgroup.procs"]) == {"cgroup.procs": f"1\n{ME}\n"}  # read file by file
    missing = cg.OpenFiles(cg.CgroupFs())
    missing.open([str(root / "memory" / "nothing-here")])
    assert missing.read(str(root / "memory"), ["nothing-here"]) == {"nothing-here": None}
    missing.close()


def test_v1_kill_empties_the_leaf_and_makes_only_joined_dirs(v1tree: tuple[FakeFs, Path, Path]) -> None:
    """A leaf is made only in the hierarchies the payload joins (never freezer: a per-test mkdir
    and rmdir for nothing); kill() SIGKILLs whatever is in them."""
    fs, root, proc = v1tree
    session = cg.detect(str(root), str(proc), mountinfo=str(root / "none"), fs=fs).open_session()
    leaf = session.new_leaf(Limits())
    assert not list((root / "freezer").rglob("t-1"))
    for procs in leaf.procs_files():
        Path(procs).write_text("301\n302\n")
    leaf.kill()
    assert leaf.pids() == [] and {p for p, _ in fs.killed} == {301, 302}
    session.remove()


def test_v1_stale_sessions_removed(v1tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v1tree
    stale = root / "pids" / "pytest-isolate-999-1"
    fs.mkdir(str(stale))
    fs.mkdir(str(stale / "t-1"))
    (stale / "t-1" / "cgroup.procs").write_text("888\n")
    session = cg.detect(str(root), str(proc), mountinfo=str(root / "none"), fs=fs).open_session()
    assert not stale.exists() and (888, signal.SIGKILL) in fs.killed
    session.remove()


def test_v1_rootless_refuses_with_the_fix(v1tree: tuple[FakeFs, Path, Path]) -> None:
    fs, root, proc = v1tree
    fs.readonly.add(str(root))
    driver = cg.detect(str(root), str(proc), mountinfo=str(root / "none"), fs=fs)
    ok, reason = driver.available()
    assert not ok and "not delegated to unprivileged users" in reason and "run as root" in reason
    with pytest.raises(CgroupError, match="unified_cgroup_hierarchy"):
        driver.open_session()


def test_v1_cpuset_comount_inherits_cpus(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "cpu,cpuset").mkdir(parents=True)
    (root / "cpu,cpuset" / "cgroup.procs").write_text(f"{ME}\n")
    (root / "cpu,cpuset" / "cpuset.cpus").write_text("0-3\n")
    (root / "cpu,cpuset" / "cpuset.mems").write_text("0\n")
    proc = tmp_path / "p"
    proc.write_text("3:cpu,cpuset:/\n")
    fs = FakeFs(root, "v1")
    session = cg.detect(str(root), str(proc), mountinfo=str(root / "none"), fs=fs).open_session()
    leaf = session.new_leaf(Limits(cpus=1))
    assert Path(leaf.path, "cpuset.cpus").read_text() == "0-3"
    with pytest.raises(CgroupError, match="'memory' controller"):
        session.new_leaf(Limits(memory=1))
    session.remove()


# ---------------------------------------------------------------- systemd scope


def test_busctl_command_matches_the_documented_call() -> None:
    assert systemd.busctl_command("u.scope", 42) == [
        "busctl", "--user", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))", "u.scope", "fail",
        "4", "PIDs", "au", "1", "42", "Delegate", "b", "true", "CollectMode", "s", "inactive-or-failed",
        "Description", "s", "pytest-isolate session of pid 42", "0",
    ]


def test_user_bus_env_defaults() -> None:
    env = systemd.user_bus_env({"PATH": "/bin"})
    assert env["XDG_RUNTIME_DIR"] == f"/run/user/{os.getuid()}"
    assert env["DBUS_SESSION_BUS_ADDRESS"] == f"unix:path=/run/user/{os.getuid()}/bus"
    assert systemd.user_bus_env({"XDG_RUNTIME_DIR": "/x"})["DBUS_SESSION_BUS_ADDRESS"] == "unix:path=/x/bus"


def test_split_signature() -> None:
    assert systemd.split_signature("ssa(sv)a(sa(sv))") == ["s", "s", "a(sv)", "a(sa(sv))"]
    assert systemd.split_signature("a{sv}y") == ["a{sv}", "y"]


def test_marshal_array_of_struct_with_variant() -> None:
    writer = systemd.Writer()
    writer.value("a(sv)", [("PIDs", ("au", [7]))])
    expected = struct.pack("<I", 24) + bytes(4) + struct.pack("<I", 4) + b"PIDs\0" + b"\x02au\0" + bytes(3)
    assert bytes(writer.data) == expected + struct.pack("<II", 4, 7)


def test_method_call_header_round_trip() -> None:
    message = systemd.method_call(9, *systemd.MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))", ["u", "fail", [], []])
    fields = systemd.parse_header_fields(message)
    assert fields == {1: "/org/freedesktop/systemd1", 2: "org.freedesktop.systemd1.Manager", 3: "StartTransientUnit",
                      6: "org.freedesktop.systemd1", 8: "ssa(sv)a(sa(sv))"}
    assert message[:4] == b"l\x01\x00\x01" and struct.unpack_from("<I", message, 8)[0] == 9


def _reply(kind: int, serial: int, error: str = "", text: str = "") -> bytes:
    """A METHOD_RETURN (2) or ERROR (3) message from the manager."""
    body = systemd.Writer()
    fields: list[tuple[int, tuple[str, object]]] = [(5, ("u", serial))]
    if kind == 3:
        body.value("s", text)
        fields += [(4, ("s", error)), (8, ("g", "s"))]
    else:
        body.value("o", "/org/freedesktop/systemd1/job/7")
        fields.append((8, ("g", "o")))
    header = systemd.Writer()
    header.data += bytes([ord("l"), kind, 0, 1]) + struct.pack("<II", len(body.data), 99)
    header.value("a(yv)", fields)
    header.align(8)
    return bytes(header.data + body.data)


def _fake_manager(path: str, answers: list[bytes], seen: list[bytes]) -> threading.Thread:
    """A unix-socket peer that authenticates, reads one call and sends ``answers``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            seen.append(conn.recv(4096))
            conn.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n")
            data = b""
            while b"BEGIN\r\n" not in data or len(data) < 200:
                data += conn.recv(65536)
            seen.append(data)
            conn.sendall(b"".join(answers))

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


@pytest.mark.parametrize("error", [False, True], ids=["started", "refused"])
def test_private_socket_client(tmp_path: Path, error: bool) -> None:
    (tmp_path / "systemd").mkdir()
    seen: list[bytes] = []
    signal_first = _reply(2, 1234)
    answer = _reply(3, 1, "org.freedesktop.DBus.Error.AccessDenied", "nope") if error else _reply(2, 1)
    thread = _fake_manager(str(tmp_path / "systemd" / "private"), [signal_first, answer], seen)
    try:
        if error:
            with pytest.raises(CgroupError, match="AccessDenied: nope"):
                systemd._via_private_socket("u.scope", 42, {"XDG_RUNTIME_DIR": str(tmp_path)})
        else:
            systemd._via_private_socket("u.scope", 42, {"XDG_RUNTIME_DIR": str(tmp_path)})
    finally:
        thread.join(5)
    assert seen[0] == b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n"
    call = seen[1].split(b"BEGIN\r\n", 1)[1]
    assert systemd.parse_header_fields(call)[3] == "StartTransientUnit" and b"u.scope" in call


def test_private_socket_missing(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="no systemd user manager"):
        systemd._via_private_socket("u.scope", 42, {"XDG_RUNTIME_DIR": str(tmp_path)})


def test_wait_for_scope_times_out_with_reason(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/job.service\n")
    with pytest.raises(CgroupError, match="systemd >= 238"):
        systemd.wait_for_scope(str(proc), "u.scope", timeout=0.05)
    proc.write_text("0::/user.slice/app.slice/u.scope\n")
    assert systemd.wait_for_scope(str(proc), "u.scope", timeout=0.05) == "/user.slice/app.slice/u.scope"
