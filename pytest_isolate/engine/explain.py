"""Explain why a sandbox could not be built: the cause, the missing feature and the fix command.

Each errno of each step is diagnosed on its own (as bubblewrap does), reading the sysctls that are
known to be in the way so the message names the one that is.
"""

from __future__ import annotations

import errno
import os

from ..linux.cgroups import INSIDE_ENV
from ..linux.probe import userns_blocking_sysctls
from .factory import SetupFailure


def in_container() -> bool:
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


CONTAINER_FIX = (
    "start the container with --security-opt seccomp=unconfined --security-opt apparmor=unconfined "
    "--security-opt systempaths=unconfined (Docker) or --security-opt unmask=ALL (Podman), or with --privileged"
)


def userns_blocker() -> tuple[str, str]:
    """(what blocks unprivileged user namespaces, the command that lifts it)."""
    blocking = userns_blocking_sysctls()
    if "kernel.apparmor_restrict_unprivileged_userns" in blocking:
        return ("AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1, "
                "Ubuntu 23.10+)", "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    if "kernel.unprivileged_userns_clone" in blocking:
        return ("unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0, Debian)",
                "sudo sysctl -w kernel.unprivileged_userns_clone=1")
    if "user.max_user_namespaces" in blocking:
        return ("user namespaces are disabled (user.max_user_namespaces=0)", "sudo sysctl -w user.max_user_namespaces=15000")
    if in_container():
        return ("the container's seccomp/AppArmor profile forbids unshare()", CONTAINER_FIX)
    return ("the kernel refused to create namespaces (seccomp, an LSM or a missing CONFIG_*_NS)",
            "check `python -m pytest_isolate doctor` and the kernel's namespace sysctls")


def explain(failure: SetupFailure) -> str:
    """A message for a test whose sandbox could not be built."""
    head = f"pytest-isolate could not build the sandbox: step '{failure.step}' failed: {failure.message}"
    cause, fix = _cause_and_fix(failure)
    return f"{head}\n  cause: {cause}\n  fix:   {fix}\n  (run `python -m pytest_isolate doctor` for the whole table of this host)"


def _cause_and_fix(failure: SetupFailure) -> tuple[str, str]:
    err, step = failure.errno, failure.step
    if step == "unshare":
        if err == errno.ENOSPC:
            return ("the user namespace limit is reached (user.max_user_namespaces)", "sudo sysctl -w user.max_user_namespaces=15000")
        if err == errno.EINVAL:
            return ("this kernel lacks a namespace type (CONFIG_USER_NS/PID_NS/NET_NS...)", "use a kernel built with namespaces")
        return userns_blocker()
    if step == "build root":
        if "proc" in failure.message and err == errno.EPERM:
            return ("/proc is masked (a container hides parts of it), so a fresh /proc cannot be mounted", CONTAINER_FIX)
        if "overlay" in failure.message and os.environ.get(INSIDE_ENV):
            return ("this sandbox is nested in another one (an isolated test, or a program started by a Sandbox): "
                    "rootless, the kernel refuses an overlay over the outer sandbox's overlay",
                    "start it from a test that is not isolated (the sandbox fixture isolates each program on its "
                    "own), or run as root")
        if "overlay" in failure.message:
            return ("the kernel refused an overlay mount in this namespace",
                    "use a kernel >= 5.11 (overlayfs in user namespaces), or run as root, or install fuse-overlayfs")
        return ("a mount in the sandbox's mount namespace was refused", CONTAINER_FIX if in_container() else "run as root")
    if step == "cgroup limits":
        cause, _, fix = failure.message.partition(" Fix: ")
        return (cause, fix or "see `python -m pytest_isolate doctor` (cgroup limits)")
    return ("an unexpected error while building the sandbox", "report it with the output of `python -m pytest_isolate doctor`")
