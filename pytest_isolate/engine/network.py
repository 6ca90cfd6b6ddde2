"""Private networks between sandboxes: ``net = sandbox.network()``; ``run(..., network=net)``.

A network is one bridge in a namespace of its own, run by a switch process (``switch.py``). Each
member gets ``eth0`` with the next address of the subnet and its host name, and every member's
``/etc/hosts`` is the same bound file, so members reach each other by name — and nothing else: the
bridge has no uplink. ``partition(a, b)`` cuts every link between the members in ``a`` and those in
``b`` (packets silently dropped, both ways); ``heal()`` restores them all.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, Iterable, Optional, Union

from .errors import IsolationUnavailable
from .factory import start_helper


class NetworkError(RuntimeError):
    """A network operation failed; the message names the member and the kernel's reason."""


def _members(group: Any) -> list[Any]:
    return list(group) if isinstance(group, (list, tuple, set, frozenset)) else [group]


class Network:
    """A private link-layer segment (see module doc); made by ``Sandbox.network()``."""

    def __init__(self, subnet: str = "10.88.0.0/24", *, userns: Optional[bool] = None) -> None:
        try:
            self.subnet = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise NetworkError(f"network(subnet={subnet!r}): {exc}") from exc
        if self.subnet.num_addresses < 4:
            raise NetworkError(f"network(subnet={subnet!r}): too small; use a /30 or larger (e.g. 10.88.0.0/24)")
        self.userns = os.getuid() != 0 if userns is None else userns
        self._free = iter(list(self.subnet.hosts())[1:])  # .1 stays free (a conventional gateway)
        self.members: dict[str, str] = {}  # host name -> address
        self.dir = tempfile.mkdtemp(prefix="pytest-isolate-net-")
        self.hosts = os.path.join(self.dir, "hosts")
        with open(self.hosts, "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        self._count = 0
        self.proc: Optional[subprocess.Popen[str]] = start_helper(
            "switch", f"serve(sys.stdin, sys.stdout, {self.userns}, {os.getuid()}, {os.getgid()})")
        try:
            self._answer("create the network")
        except NetworkError as exc:
            self.close()
            raise IsolationUnavailable(f"{exc}. Fix: check `python -m pytest_isolate doctor` (network namespace, "
                                       f"user namespaces)") from exc

    def _answer(self, what: str) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        answer = json.loads(line) if line else {"error": f"the network's switch exited ({self.proc.poll()})"}
        if "error" in answer:
            raise NetworkError(f"{what}: {answer['error']}")

    def _request(self, what: str, **request: Any) -> None:
        if self.proc is None:
            raise NetworkError(f"{what}: this network is closed")
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        self._answer(what)

    # ------------------------------------------------------------------------ for the Sandbox --

    def _next_name(self) -> str:
        self._count += 1
        return f"node{self._count}"

    def _attachment(self) -> tuple[tuple[tuple[str, str], ...], int]:
        """(binds every member gets, the switch's PID when members must share its user namespace)."""
        if self.proc is None:
            raise NetworkError("this network is closed")
        return ((self.hosts, "/etc/hosts"),), (self.proc.pid if self.userns else 0)

    def _attach(self, init: int, name: str) -> str:
        """Wire the sandbox whose init is ``init`` to the bridge as ``name``; returns its address."""
        if name in self.members:
            raise NetworkError(f"a member named {name!r} is already on this network; give each a distinct hostname=")
        try:
            address = str(next(self._free))
        except StopIteration:
            raise NetworkError(f"the subnet {self.subnet} has no free address left") from None
        self._request(f"attach {name!r}", op="attach", name=name, pid=init, address=f"{address}/{self.subnet.prefixlen}")
        self.members[name] = address
        with open(self.hosts, "a") as f:  # appended in place: every member's bind sees it
            f.write(f"{address}\t{name}\n")
        return address

    # ------------------------------------------------------------------------------ for users --

    def _name(self, member: Union[str, Any]) -> str:
        name = member if isinstance(member, str) else getattr(member, "hostname", None)
        if name not in self.members:
            raise NetworkError(f"{member!r} is not a member of this network (members: {', '.join(self.members) or 'none'})")
        return str(name)

    def address(self, member: Union[str, Any]) -> str:
        """The IPv4 address of a member (a process started with ``network=`` this, or its host name)."""
        return self.members[self._name(member)]

    def partition(self, a: Union[Any, Iterable[Any]], b: Union[Any, Iterable[Any]]) -> None:
        """Cut every link between the members in ``a`` and those in ``b`` (each a member or a list)."""
        left, right = [self._name(m) for m in _members(a)], [self._name(m) for m in _members(b)]
        for x in left:
            for y in right:
                if x == y:
                    raise NetworkError(f"partition: {x!r} is on both sides")
                self._request(f"cut {x}->{y}", op="cut", name=x, peer_address=self.members[y])
                self._request(f"cut {y}->{x}", op="cut", name=y, peer_address=self.members[x])

    def heal(self) -> None:
        """Restore every link cut by ``partition``."""
        self._request("heal", op="heal")

    def close(self) -> None:
        """Stop the switch (the bridge and the members' links go with its namespace)."""
        if self.proc is not None:
            proc, self.proc = self.proc, None
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<Network {self.subnet} members={self.members}>"
