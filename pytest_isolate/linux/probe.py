"""Probe, once, what isolation this host allows: one frozen ``Capabilities`` value.

Each feature is tried for real in a forked child (a namespace cannot be tested without entering it),
the way the sandbox itself will use it: rootless, every namespace is created together with a user
namespace. A failed probe keeps its errno and message; the engine's ``explain`` turns it into a fix.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Callable, Optional

from . import libc
from .cgroups import Driver, detect
from .net import loopback_up
from .userns import write_identity_maps


@dataclass(frozen=True)
class Feature:
    """One probed feature: whether it works and, if not, the errno and message of the failing call."""

    name: str
    ok: bool
    detail: str = ""
    errno: Optional[int] = None
    required: bool = True


@dataclass(frozen=True)
class Capabilities:
    """What this host allows, for this user. Branch on these flags, never on guesses."""

    root: bool
    kernel: str
    features: tuple[Feature, ...]

    def get(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)

    @property
    def full(self) -> bool:
        return all(f.ok for f in self.features if f.required)

    @property
    def missing(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.required and not f.ok)


def _in_child(func: Callable[[], str]) -> tuple[bool, str, Optional[int]]:
    """Run ``func`` in a forked child; (ok, detail or error message, errno)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            result = {"ok": True, "detail": func()}
        except OSError as exc:
            result = {"ok": False, "detail": str(exc), "errno": exc.errno}
        except BaseException as exc:
            result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    try:
        result = json.loads(data)
    except ValueError:
        return False, "the probe process died", None
    return bool(result["ok"]), str(result.get("detail", "")), result.get("errno")


def _enter(flags: int, userns: bool) -> None:
    uid, gid = os.getuid(), os.getgid()
    libc.unshare(flags | (libc.CLONE_NEWUSER if userns else 0))
    if userns:
        write_identity_maps(uid, gid)


def _fork_and(func: Callable[[], None]) -> None:
    """Run ``func`` in a grandchild (the first process of a new PID namespace); raise what it raised."""

    def run() -> str:
        func()
        return ""

    ok, detail, err = _in_child(run)
    if not ok:
        raise OSError(err or 0, detail)


def _proc_probe(userns: bool) -> str:
    _enter(libc.CLONE_NEWNS | libc.CLONE_NEWPID, userns)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    _fork_and(lambda: libc.mount("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC))
    return "a fresh /proc can be mounted"


def _overlay_probe(userns: bool, lower: str) -> str:
    _enter(libc.CLONE_NEWNS, userns)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    base = "/tmp"  # a tmpfs over /tmp in this private mount namespace: nothing touches the host
    libc.mount("tmpfs", base, "tmpfs", 0, "size=1M")
    for d in ("upper", "work", "merged"):
        os.mkdir(f"{base}/{d}")
    data = f"lowerdir={lower},upperdir={base}/upper,workdir={base}/work" + (",userxattr" if userns else "")
    libc.mount("overlay", f"{base}/merged", "overlay", 0, data)
    return f"overlay over {lower} with its upper on tmpfs"


def _tmpfs_xattr_probe(userns: bool) -> str:
    _enter(libc.CLONE_NEWNS, userns)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    base = "/tmp"
    libc.mount("tmpfs", base, "tmpfs", 0, "size=1M")
    os.setxattr(base, "user.pytest-isolate" if userns else "trusted.pytest-isolate", b"1")
    return "tmpfs holds the overlay xattrs: upper layers live in memory"


def _named(name: str, func: Callable[[], str], required: bool = True) -> Feature:
    ok, detail, err = _in_child(func)
    return Feature(name, ok, detail, err, required)


NAMESPACES = (
    ("user namespace", libc.CLONE_NEWUSER),
    ("mount namespace", libc.CLONE_NEWNS),
    ("PID namespace", libc.CLONE_NEWPID),
    ("network namespace", libc.CLONE_NEWNET),
    ("UTS namespace", libc.CLONE_NEWUTS),
    ("IPC namespace", libc.CLONE_NEWIPC),
    ("cgroup namespace", libc.CLONE_NEWCGROUP),
)


def _namespace_features(userns: bool) -> list[Feature]:
    """All namespaces in one unshare() (the common case: one fork); one by one only if that fails."""
    every = 0
    for _, flag in NAMESPACES:
        every |= flag
    ok, _, _ = _in_child(lambda: _unshare_probe(every & ~libc.CLONE_NEWUSER, userns))
    features = []
    for name, flag in NAMESPACES:
        required = flag != libc.CLONE_NEWUSER or userns
        if ok:
            features.append(Feature(name, True, "unshare() works", None, required))
        else:
            features.append(_named(name, functools.partial(_unshare_probe, flag & ~libc.CLONE_NEWUSER, userns or flag == libc.CLONE_NEWUSER), required))
    return features


def _unshare_probe(flags: int, userns: bool) -> str:
    _enter(flags, userns)
    return "unshare() works"


def _loopback_probe(userns: bool) -> str:
    _enter(libc.CLONE_NEWNET, userns)
    loopback_up()
    return "lo is up"


def _hostname_probe(userns: bool) -> str:
    _enter(libc.CLONE_NEWUTS, userns)
    socket.sethostname("probe")
    return "settable"


def _cgroup_feature(driver: Optional[Driver]) -> Feature:
    """Limits and exact accounting need writable (delegated) cgroups; isolation works without."""
    driver = driver or detect()
    ok, reason = driver.available()
    detail = reason if reason.startswith("cgroup") else f"cgroup {driver.name}: {reason}"
    return Feature("cgroup limits", ok, detail, None, required=False)


def read_text(path: str) -> Optional[str]:
    """A small kernel file's stripped text (a sysctl, a status file), or None if unreadable."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# The sysctls known to block unprivileged user namespaces, and the value that blocks.
USERNS_SYSCTLS = {"user.max_user_namespaces": "0", "kernel.unprivileged_userns_clone": "0",
                  "kernel.apparmor_restrict_unprivileged_userns": "1"}


def sysctl(name: str) -> Optional[str]:
    return read_text("/proc/sys/" + name.replace(".", "/"))


def userns_blocking_sysctls() -> list[str]:
    """Those of USERNS_SYSCTLS set to their blocking value here."""
    return [name for name, blocks in USERNS_SYSCTLS.items() if sysctl(name) == blocks]


def _sysctl_feature() -> Feature:
    """The sysctls known to block unprivileged user namespaces, with their values."""
    values = {name: sysctl(name) for name in USERNS_SYSCTLS}
    blocking = any(values[name] == blocks for name, blocks in USERNS_SYSCTLS.items())
    detail = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
    return Feature("user namespace sysctls", not blocking, detail or "none of them exists here", None, required=False)


def _seccomp_feature() -> Feature:
    """Whether a seccomp filter is on (containers' profiles refuse unshare/mount): informational."""
    status = dict(line.split(":\t", 1) for line in (read_text("/proc/self/status") or "").splitlines() if ":\t" in line)
    mode = status.get("Seccomp", "?").strip()
    filters = status.get("Seccomp_filters", "?").strip()
    detail = {"0": "off", "1": "strict mode", "2": f"filter mode, {filters} filter(s): a profile may refuse unshare() or mount()"}
    return Feature("seccomp", True, detail.get(mode, f"mode {mode}"), None, required=False)


def _cgroup_version_feature(driver: Optional[Driver]) -> Feature:
    """v1, v2 or none; hybrid hosts (controllers in v1, a controller-less cgroup2 beside) count as v1."""
    driver = driver or detect()
    if driver.name == "v2":
        return Feature("cgroup version", True, "v2 (unified hierarchy)", None, required=False)
    if driver.name == "v1":
        hybrid = os.path.isdir("/sys/fs/cgroup/unified") and os.path.exists("/sys/fs/cgroup/unified/cgroup.controllers")
        return Feature("cgroup version", True, "v1" + (" (hybrid: an empty cgroup2 at /sys/fs/cgroup/unified)" if hybrid else ""),
                       None, required=False)
    return Feature("cgroup version", False, getattr(driver, "reason", "no cgroup filesystem"), None, required=False)


def _systemd_user_feature() -> Optional[Feature]:
    """Rootless: the user's systemd manager, which hands out delegated scopes on cgroup v2."""
    if os.getuid() == 0:
        return None
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    for path in (os.path.join(runtime, "systemd", "private"), os.path.join(runtime, "bus")):
        if os.path.exists(path):
            return Feature("systemd user manager", True, f"reachable at {path}", None, required=False)
    return Feature("systemd user manager", False, f"no socket under {runtime} (systemd/private or bus)", None,
                   required=False)


def probe(lower: str = "/usr", cgroups: Optional[Driver] = None) -> Capabilities:
    """Try every feature the sandbox needs, each in its own child process (a few ms in all).

    ``cgroups``: the session's driver, so that its (cached, possibly process-moving) availability
    check is done once; detected afresh when not given.
    """
    userns = os.getuid() != 0
    features = _namespace_features(userns)
    features.append(_named("loopback network", lambda: _loopback_probe(userns)))
    features.append(_named("hostname", lambda: _hostname_probe(userns)))
    features.append(_named("fresh /proc", lambda: _proc_probe(userns)))
    features.append(_named("overlay mount", lambda: _overlay_probe(userns, lower)))
    features.append(_named("tmpfs upper layer", lambda: _tmpfs_xattr_probe(userns), required=False))
    fuse = shutil.which("fuse-overlayfs")
    features.append(Feature("fuse-overlayfs", bool(fuse), fuse or "not installed", None, required=False))
    features.append(_cgroup_version_feature(cgroups))
    features.append(_cgroup_feature(cgroups))
    user_manager = _systemd_user_feature()
    if user_manager is not None:
        features.append(user_manager)
    features.append(_sysctl_feature())
    features.append(_seccomp_feature())
    return Capabilities(root=not userns, kernel=os.uname().release, features=tuple(features))
