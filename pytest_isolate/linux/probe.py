"""Probe, once, what isolation this host allows: one frozen ``Capabilities`` value.

Each feature is tried for real in a forked child (a namespace cannot be tested without entering it),
the way the sandbox itself will use it: rootless, every namespace is created together with a user
namespace. One child tries them all where the host allows every namespace (a fork costs the
start-up of every run some milliseconds); a child per feature only where it does not. A failed probe keeps its errno and message; the engine's ``explain`` turns it into a fix.
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

    @functools.cached_property
    def full(self) -> bool:
        """Every required feature works (asked twice per isolated test: computed once)."""
        return all(f.ok for f in self.features if f.required)

    @property
    def missing(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.required and not f.ok)


Result = tuple[bool, str, Optional[int]]  # ok, detail or error message, errno


def _attempt(func: Callable[[], str]) -> Result:
    """Call ``func`` (which may raise anything) and say how it went."""
    try:
        return True, func(), None
    except OSError as exc:
        return False, str(exc), exc.errno
    except BaseException as exc:
        return False, f"{type(exc).__name__}: {exc}", None


class _Child:
    """``func`` running in a forked child, which sends back the results it returned by name."""

    def __init__(self, func: Callable[[], dict[str, Result]]) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                os.write(write, json.dumps(func()).encode())
            finally:
                os._exit(0)
        os.close(write)
        self.pid, self.read = pid, read
        self._results: Optional[dict[str, Result]] = None

    def results(self) -> dict[str, Result]:
        """Wait for the child: its results (none if it died)."""
        if self._results is None:
            with os.fdopen(self.read, "rb") as f:
                data = f.read()
            os.waitpid(self.pid, 0)
            try:
                self._results = {name: (bool(ok), str(detail), errno)
                                 for name, (ok, detail, errno) in json.loads(data).items()}
            except ValueError:
                self._results = {}
        return self._results


def _in_child_each(func: Callable[[], dict[str, Result]]) -> dict[str, Result]:
    """Run ``func`` in a forked child: the results it returned by name (none if it died)."""
    return _Child(func).results()


def _in_child(func: Callable[[], str]) -> Result:
    """Run ``func`` in a forked child and say how it went."""
    return _in_child_each(lambda: {"": _attempt(func)}).get("", (False, "the probe process died", None))


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


def _private_root() -> None:
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)


def _proc_step() -> str:
    _private_root()
    _fork_and(lambda: libc.mount("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC))
    return "a fresh /proc can be mounted"


def _overlay_step(userns: bool, lower: str) -> str:
    _private_root()
    base = "/tmp"  # a tmpfs over /tmp in this private mount namespace: nothing touches the host
    libc.mount("tmpfs", base, "tmpfs", 0, "size=1M")
    for d in ("upper", "work", "merged"):
        os.mkdir(f"{base}/{d}")
    data = f"lowerdir={lower},upperdir={base}/upper,workdir={base}/work" + (",userxattr" if userns else "")
    libc.mount("overlay", f"{base}/merged", "overlay", 0, data)
    return f"overlay over {lower} with its upper on tmpfs"


def _tmpfs_xattr_step(userns: bool) -> str:
    _private_root()
    base = "/tmp"
    libc.mount("tmpfs", base, "tmpfs", 0, "size=1M")
    os.setxattr(base, "user.pytest-isolate" if userns else "trusted.pytest-isolate", b"1")
    return "tmpfs holds the overlay xattrs: upper layers live in memory"


def _loopback_step() -> str:
    loopback_up()
    return "lo is up"


def _hostname_step() -> str:
    socket.sethostname("probe")
    return "settable"


def _steps(userns: bool, lower: str) -> tuple[tuple[str, int, Callable[[], str], bool], ...]:
    """Each feature tried inside namespaces: its name, the namespaces it needs, the try, required."""
    return (
        ("loopback network", libc.CLONE_NEWNET, _loopback_step, True),
        ("hostname", libc.CLONE_NEWUTS, _hostname_step, True),
        ("fresh /proc", libc.CLONE_NEWNS | libc.CLONE_NEWPID, _proc_step, True),
        ("overlay mount", libc.CLONE_NEWNS, functools.partial(_overlay_step, userns, lower), True),
        ("tmpfs upper layer", libc.CLONE_NEWNS, functools.partial(_tmpfs_xattr_step, userns), False),
    )


def _in_own_namespaces(flags: int, userns: bool, step: Callable[[], str]) -> str:
    _enter(flags, userns)
    return step()


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


def _every_namespace() -> int:
    every = 0
    for _, flag in NAMESPACES:
        every |= flag
    return every & ~libc.CLONE_NEWUSER


def _namespace_features(userns: bool) -> list[Feature]:
    """Each namespace on its own (after unshare() of them all at once failed)."""
    features = []
    for name, flag in NAMESPACES:
        required = flag != libc.CLONE_NEWUSER or userns
        features.append(_named(name, functools.partial(_unshare_probe, flag & ~libc.CLONE_NEWUSER, userns or flag == libc.CLONE_NEWUSER), required))
    return features


class Started:
    """The probe's child, started early (:func:`start`): it tries the namespaces while pytest
    loads conftest files and collects; :func:`probe` reads what it found."""

    def __init__(self, lower: str = "/usr") -> None:
        self.userns, self.lower = os.getuid() != 0, lower
        steps = _steps(self.userns, lower)
        userns = self.userns

        def run() -> dict[str, Result]:
            _enter(_every_namespace(), userns)
            return {name: _attempt(step) for name, _, step, _ in steps}

        self.child = _Child(run)

    def close(self) -> None:
        """Reap the child if nobody asked for its results (it ends by itself within milliseconds)."""
        self.child.results()


def start(lower: str = "/usr") -> Started:
    """Fork the probe's child now; :func:`probe` with ``started=`` collects it."""
    return Started(lower)


def _all_in_one_child(userns: bool, lower: str, started: Optional[Started] = None) -> list[Feature]:
    """The common case, a host that allows everything: every namespace in one unshare() and every
    feature tried in that child (one fork, and one for /proc's new PID namespace, instead of
    seven). Empty when the unshare() fails: then each is tried on its own, for its own error."""
    steps = _steps(userns, lower)
    if started is None or (started.userns, started.lower) != (userns, lower):
        started = Started(lower)
    results = started.child.results()
    if any(name not in results for name, _, _, _ in steps):
        return []
    features = [Feature(name, True, "unshare() works", None, flag != libc.CLONE_NEWUSER or userns) for name, flag in NAMESPACES]
    for name, _, _, required in steps:
        ok, detail, err = results[name]
        features.append(Feature(name, ok, detail, err, required))
    return features


def _one_by_one(userns: bool, lower: str) -> list[Feature]:
    """Each namespace and each feature in a child of its own: what fails is told apart."""
    features = _namespace_features(userns)
    for name, flags, step, required in _steps(userns, lower):
        features.append(_named(name, functools.partial(_in_own_namespaces, flags, userns, step), required))
    return features


def _unshare_probe(flags: int, userns: bool) -> str:
    _enter(flags, userns)
    return "unshare() works"


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


def relay_feature() -> Feature:
    """Whether rootless test processes come from the native relay (relay.py). For
    the doctor only: the plugin never branches on it, and making the relay (a fork, ~2 ms) is
    left to the first rootless test."""
    from . import relay

    ok = relay.native() is not None
    detail = "the relay is the only copy of pytest made per test" if ok else relay.why_not()
    return Feature("native relay", ok, detail, None, required=False)


def probe(lower: str = "/usr", cgroups: Optional[Driver] = None, one_by_one: bool = False,
          started: Optional[Started] = None) -> Capabilities:
    """Try every feature the sandbox needs, in one child process where the host allows all of them.

    ``cgroups``: the session's driver, so that its (cached, possibly process-moving) availability
    check is done once; detected afresh when not given. ``one_by_one``: a child per feature even
    where one would do (what the result must not depend on). ``started``: that child, forked
    earlier by :func:`start` (the plugin does so before pytest loads conftest files).
    """
    userns = os.getuid() != 0
    features = ([] if one_by_one else _all_in_one_child(userns, lower, started)) or _one_by_one(userns, lower)
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
