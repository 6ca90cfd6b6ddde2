"""The exceptions and warning of the Sandbox API; each message says what happened and what to do."""

from __future__ import annotations

import signal
import subprocess
from typing import TYPE_CHECKING, Any

from .accounting import human_bytes

if TYPE_CHECKING:
    from .sandbox import SandboxResult

STDERR_TAIL = 20


class IsolationUnavailable(RuntimeError):
    """This host cannot give an isolation feature that was asked for (the message has the fix)."""


class IsolationDegradedWarning(UserWarning):
    """Something ran with less isolation than asked for (policy "degrade"); names what is missing."""


class SandboxCallError(RuntimeError):
    """``Sandbox.call``: the callable's process died before returning, or the traceback of its exception."""


def signal_name(num: int) -> str:
    """"SIGSEGV" for 11; "signal 77" for a number this Python has no name for."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _ending(result: "SandboxResult") -> str:
    spec = result.spec
    if result.timed_out:
        return f"timed out after {result.usage.wall or 0:.1f}s (limit {spec.timeout:g}s); every process of the sandbox was killed"
    if result.oom_killed:
        return (f"OOM-killed: memory limit {human_bytes(spec.memory)} reached "
                f"(peak {human_bytes(result.usage.memory_peak)})")
    if result.returncode < 0:
        return f"killed by {signal_name(-result.returncode)}"
    return f"exit status {result.returncode}"


class SandboxRunError(subprocess.CalledProcessError):
    """``Sandbox.run(check=True)`` on a failed command: the command, how it ended, usage, stderr tail."""

    def __init__(self, result: "SandboxResult") -> None:
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)
        self.result = result

    def __str__(self) -> str:
        r = self.result
        u = r.usage
        lines = [f"command {r.args!r} failed in its sandbox: {_ending(r)}",
                 f"  usage: peak memory {human_bytes(u.memory_peak)}, cpu user {u.cpu_user or 0:.2f}s "
                 f"system {u.cpu_system or 0:.2f}s, wall {u.wall or 0:.2f}s"]
        err: Any = r.stderr
        if err:
            text = err.decode(errors="replace") if isinstance(err, bytes) else str(err)
            tail = text.rstrip("\n").splitlines()[-STDERR_TAIL:]
            lines.append(f"  stderr (last {len(tail)} lines):")
            lines.extend("    " + line for line in tail)
        return "\n".join(lines)
