"""Join another process's namespaces: with a single setns(2) on a pidfd where the kernel allows it.

Since Linux 5.8, setns accepts a pidfd and a set of CLONE_NEW* flags and moves the caller into all
of those namespaces of that process at once: one call, one credential change, no /proc lookups.
Before 5.8 it takes one /proc/PID/ns/NAME file per namespace, opened while /proc is still the
host's (once the caller has joined a mount namespace, /proc is the sandbox's).
"""

from __future__ import annotations

import os

from . import libc

NAMES = {libc.CLONE_NEWUSER: "user", libc.CLONE_NEWNS: "mnt", libc.CLONE_NEWNET: "net",
         libc.CLONE_NEWUTS: "uts", libc.CLONE_NEWIPC: "ipc", libc.CLONE_NEWCGROUP: "cgroup",
         libc.CLONE_NEWPID: "pid"}
ORDER = tuple(NAMES)  # the user namespace first: it grants the capabilities the others need


def _kernel_at_least(major: int, minor: int, release: str = "") -> bool:
    parts = (release or os.uname().release).split("-")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


PIDFD_SETNS = _kernel_at_least(5, 8) and hasattr(os, "pidfd_open")


class Namespaces:
    """A handle on some namespaces of one process, joinable in any subset (see module doc).

    Made in the supervisor and inherited by its forks; each process that joins closes its copy."""

    def __init__(self, pid: int, flags: int, pidfd: bool = True) -> None:
        """``pidfd=False``: hold the namespaces ``pid`` has now (one fd each), not wherever it is
        when :meth:`join` is called."""
        self.pidfd = -1
        self.fds: dict[int, int] = {}
        if PIDFD_SETNS and pidfd:
            self.pidfd = os.pidfd_open(pid)  # close-on-exec, as every pidfd
            return
        try:
            for flag in ORDER:
                if flags & flag:
                    self.fds[flag] = os.open(f"/proc/{pid}/ns/{NAMES[flag]}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.close()
            raise

    def join(self, flags: int) -> None:
        """Enter the namespaces in ``flags`` (CLONE_NEWPID: only what our children will be born in)."""
        if self.pidfd >= 0:
            libc.setns(self.pidfd, flags)
            return
        for flag in ORDER:
            if flags & flag:
                libc.setns(self.fds[flag], flag)

    def pairs(self, flags: int) -> list[tuple[int, int]]:
        """The setns(2) calls :meth:`join` makes for ``flags``, as (fd, nstype): for code that joins
        without Python (relay.py)."""
        if self.pidfd >= 0:
            return [(self.pidfd, flags)]
        return [(self.fds[flag], flag) for flag in ORDER if flags & flag]

    def close(self) -> None:
        for fd in [self.pidfd, *self.fds.values()]:
            if fd >= 0:
                os.close(fd)
        self.pidfd, self.fds = -1, {}
