"""Get a delegated cgroup v2 scope from the user's systemd manager, without dependencies.

What ``systemd-run --user --scope -p Delegate=yes`` does for a new command, done for the
running process: ``StartTransientUnit`` with ``PIDs=[getpid()]`` and ``Delegate=yes``.  The
user manager cannot move a process out of a cgroup it does not own (say a CI job's
``system.slice/job.service``), so it asks the system manager to (systemd >= 238).  Then this
process's cgroup is the scope, owned by the user, and the v2 driver works inside it.

Two ways to reach the manager, tried in this order:

1. its private socket ``$XDG_RUNTIME_DIR/systemd/private``, which exists whenever the user
   manager runs (systemctl --user uses it too), with the few lines of D-Bus wire protocol
   below; hosts without ``dbus-user-session`` (minimal Debian) have no user bus at all;
2. ``busctl --user`` over the user bus, when there is one.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from typing import Any, Optional

from pytest_isolate.linux.cgroups import CgroupError, CgroupFs, parse_proc_cgroup, session_name

MANAGER = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
SIGNATURE = "ssa(sv)a(sa(sv))"
TIMEOUT = 15.0


def user_bus_env(environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment with XDG_RUNTIME_DIR and DBUS_SESSION_BUS_ADDRESS defaulted the way
    pam_systemd sets them (a CI job started from a service has neither)."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    env.setdefault("DBUS_SESSION_BUS_ADDRESS", f"unix:path={env['XDG_RUNTIME_DIR']}/bus")
    return env


def scope_properties(pid: int) -> list[tuple[str, tuple[str, Any]]]:
    """The unit's properties: our pid, delegation, and garbage collection even if failed."""
    return [
        ("PIDs", ("au", [pid])),
        ("Delegate", ("b", True)),
        ("CollectMode", ("s", "inactive-or-failed")),
        ("Description", ("s", f"pytest-isolate session of pid {pid}")),
    ]


SYSTEM_PRIVATE = "/run/systemd/private"


def start_delegated_scope(proc_self_cgroup: str = "/proc/self/cgroup", timeout: float = TIMEOUT,
                          system: bool = False) -> str:
    """Move this process into a new delegated scope; return its cgroup path (as in
    ``/proc/self/cgroup``).  Raises CgroupError saying what failed on each way tried.

    ``system``: ask the system manager (root), not the user's. Root needs this where its cgroup is
    a systemd service's (a CI job): enabling controllers there means moving the service's own
    processes, and an OOM kill below it counts against the service, whose OOMPolicy=stop then
    stops the whole job. A delegated scope holds only this process and defaults to
    OOMPolicy=continue.
    """
    pid = os.getpid()
    unit = f"{session_name(CgroupFs(), pid)}.scope"
    env = user_bus_env()
    failures = []
    who = "system" if system else "user's"
    for way in (_via_private_socket, _via_busctl):
        try:
            way(unit, pid, env, system)
            break
        except CgroupError as e:
            failures.append(str(e))
    else:
        raise CgroupError(f"the {who} systemd manager gave no delegated scope (" + "; ".join(failures) + ")")
    return wait_for_scope(proc_self_cgroup, unit, timeout)


def wait_for_scope(proc_self_cgroup: str, unit: str, timeout: float) -> str:
    """StartTransientUnit only queues a job: poll until the kernel shows us in the scope."""
    deadline = time.monotonic() + timeout
    while True:
        with open(proc_self_cgroup, encoding="ascii") as f:
            path = parse_proc_cgroup(f.read()).get("", "")
        if path.endswith("/" + unit):
            return path
        if time.monotonic() > deadline:
            raise CgroupError(
                f"systemd accepted {unit} but did not move pid {os.getpid()} into it within "
                f"{timeout:.0f}s (still in {path}); moving a process needs systemd >= 238"
            )
        time.sleep(0.02)


def busctl_command(unit: str, pid: int, system: bool = False) -> list[str]:
    """``busctl --user call ... StartTransientUnit`` with :func:`scope_properties`."""
    args = ["busctl", "--system" if system else "--user", "call", *MANAGER, "StartTransientUnit", SIGNATURE, unit, "fail"]
    props = scope_properties(pid)
    args.append(str(len(props)))
    for name, (sig, value) in props:
        args += [name, sig, *_busctl_value(sig, value)]
    return args + ["0"]


def _busctl_value(sig: str, value: Any) -> list[str]:
    if sig == "au":
        return [str(len(value)), *map(str, value)]
    if sig == "b":
        return ["true" if value else "false"]
    return [str(value)]


def _via_busctl(unit: str, pid: int, env: dict[str, str], system: bool = False) -> None:
    flag = "--system" if system else "--user"
    if shutil.which("busctl") is None:
        raise CgroupError("busctl is not installed")
    try:
        done = subprocess.run(busctl_command(unit, pid, system), env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise CgroupError(f"busctl {flag} did not answer within {TIMEOUT:.0f}s") from e
    if done.returncode != 0:
        raise CgroupError(f"busctl {flag} call StartTransientUnit failed: {done.stderr.strip()}")


def _via_private_socket(unit: str, pid: int, env: dict[str, str], system: bool = False) -> None:
    path = SYSTEM_PRIVATE if system else os.path.join(env["XDG_RUNTIME_DIR"], "systemd", "private")
    if not os.path.exists(path):
        who = "systemd system manager" if system else f"systemd user manager for uid {os.getuid()}"
        raise CgroupError(f"no {who} ({path} does not exist)")
    message = method_call(1, *MANAGER, "StartTransientUnit", SIGNATURE, [unit, "fail", scope_properties(pid), []])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            authenticate(sock)
            sock.sendall(message)
            reply_to(sock, 1)
    except OSError as e:
        raise CgroupError(f"talking to the systemd manager at {path} failed: {e}") from e


# ---------------------------------------------------------------- D-Bus wire protocol


def authenticate(sock: socket.socket) -> None:
    """SASL EXTERNAL: the peer knows our uid from the socket; we state it in hex."""
    sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
    answer = _read_line(sock)
    if not answer.startswith(b"OK "):
        raise CgroupError(f"the systemd user manager refused authentication: {answer!r}")
    sock.sendall(b"BEGIN\r\n")


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise CgroupError("the systemd user manager closed the connection during authentication")
        data += chunk
    return data


def split_signature(signature: str) -> list[str]:
    """``"ssa(sv)"`` -> ``["s", "s", "a(sv)"]``: the complete types in a signature."""
    types, i = [], 0
    while i < len(signature):
        end = _type_end(signature, i)
        types.append(signature[i:end])
        i = end
    return types


def _type_end(signature: str, i: int) -> int:
    if signature[i] == "a":
        return _type_end(signature, i + 1)
    if signature[i] not in "({":
        return i + 1
    depth = 0
    for j in range(i, len(signature)):
        depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(signature[j], 0)
        if depth == 0:
            return j + 1
    raise ValueError(f"unbalanced D-Bus signature {signature!r}")


_ALIGN = {"y": 1, "g": 1, "v": 1, "b": 4, "u": 4, "i": 4, "s": 4, "o": 4, "a": 4, "(": 8, "{": 8, "t": 8, "x": 8}


class Writer:
    """Little-endian D-Bus marshalling of the types StartTransientUnit needs."""

    def __init__(self) -> None:
        self.data = bytearray()

    def align(self, n: int) -> None:
        self.data += b"\0" * (-len(self.data) % n)

    def value(self, sig: str, value: Any) -> None:
        self.align(_ALIGN[sig[0]])
        if sig in ("s", "o"):
            encoded = value.encode()
            self.data += struct.pack("<I", len(encoded)) + encoded + b"\0"
        elif sig == "g":
            self.data += bytes([len(value)]) + value.encode() + b"\0"
        elif sig in ("u", "b"):
            self.data += struct.pack("<I", int(value))
        elif sig == "y":
            self.data.append(value)
        elif sig == "v":
            self.value("g", value[0])
            self.value(value[0], value[1])
        elif sig[0] == "a":
            self._array(sig[1:], value)
        else:
            for field_sig, item in zip(split_signature(sig[1:-1]), value):
                self.value(field_sig, item)

    def _array(self, element: str, items: Any) -> None:
        """Length, padding to the element alignment (not counted), elements."""
        at = len(self.data)
        self.data += b"\0\0\0\0"
        self.align(_ALIGN[element[0]])
        start = len(self.data)
        for item in items:
            self.value(element, item)
        struct.pack_into("<I", self.data, at, len(self.data) - start)


def method_call(serial: int, destination: str, path: str, interface: str, member: str, signature: str, args: list[Any]) -> bytes:
    """A complete METHOD_CALL message."""
    body = Writer()
    for sig, arg in zip(split_signature(signature), args):
        body.value(sig, arg)
    fields = [(1, ("o", path)), (2, ("s", interface)), (3, ("s", member)), (6, ("s", destination)), (8, ("g", signature))]
    header = Writer()
    header.data += b"l\x01\x00\x01" + struct.pack("<II", len(body.data), serial)
    header.value("a(yv)", fields)
    header.align(8)
    return bytes(header.data + body.data)


class Reader:
    """Just enough unmarshalling for reply headers and an error's message."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def value(self, sig: str) -> Any:
        self.pos += -self.pos % _ALIGN[sig]
        if sig in ("s", "o"):
            (n,) = struct.unpack_from("<I", self.data, self.pos)
            self.pos += 4 + n + 1
            return self.data[self.pos - n - 1 : self.pos - 1].decode()
        if sig == "g":
            n = self.data[self.pos]
            self.pos += 1 + n + 1
            return self.data[self.pos - n - 1 : self.pos - 1].decode()
        if sig == "y":
            self.pos += 1
            return self.data[self.pos - 1]
        (number,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        return number


def parse_header_fields(message: bytes) -> dict[int, Any]:
    """The header fields of a whole message, {code: value}; only basic-typed fields occur."""
    (length,) = struct.unpack_from("<I", message, 12)
    reader, fields = Reader(message, 16), {}
    while reader.pos < 16 + length:
        reader.pos += -reader.pos % 8
        code = reader.value("y")
        fields[code] = reader.value(reader.value("g"))
    return fields


def read_message(sock: socket.socket) -> bytes:
    """One whole message from the socket (little-endian peers only: systemd on x86/arm)."""
    fixed = _recv_exact(sock, 16)
    if fixed[:1] != b"l":
        raise CgroupError("the systemd user manager answered in big-endian D-Bus, which is not supported")
    body_length, fields_length = struct.unpack_from("<I", fixed, 4)[0], struct.unpack_from("<I", fixed, 12)[0]
    header_length = 16 + fields_length + (-(16 + fields_length) % 8)
    return fixed + _recv_exact(sock, header_length - 16 + body_length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise CgroupError("the systemd user manager closed the connection")
        data += chunk
    return data


def reply_to(sock: socket.socket, serial: int) -> None:
    """Wait for the reply to ``serial`` (skipping signals); an ERROR becomes CgroupError."""
    while True:
        message = read_message(sock)
        fields = parse_header_fields(message)
        if fields.get(5) != serial:
            continue
        if message[1] == 3:
            raise CgroupError(f"StartTransientUnit failed: {fields.get(4)}: {_error_text(message)}")
        return


def _error_text(message: bytes) -> str:
    """The first string of an ERROR's body, if its signature starts with one."""
    fields = parse_header_fields(message)
    if not str(fields.get(8, "")).startswith("s"):
        return ""
    (fields_length,) = struct.unpack_from("<I", message, 12)
    start = 16 + fields_length + (-(16 + fields_length) % 8)
    return str(Reader(message[start:]).value("s"))
