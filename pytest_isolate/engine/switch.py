"""The switch of a sandbox network: a small process that owns the bridge and wires members to it.

It runs in a network namespace of its own (plus, rootless, a user namespace of its own that every
member shares, so that it holds CAP_NET_ADMIN over the members' network namespaces too). Per member
it creates a veth pair with one end directly inside the member's namespace (creating in place is an
order of magnitude faster than moving a link), enslaves the other end to the bridge, and gives the
member its address. A partition routes a peer's address into a "sink" link that drops everything,
so packets vanish as on a real cut link (a blackhole route would fail sends at once instead).

Requests are JSON lines on stdin, answers JSON lines on stdout.
"""

from __future__ import annotations

import json
import os
import signal
from typing import IO, Any

from ..linux import libc
from ..linux.netlink import Netlink
from ..linux.net import loopback_up
from ..linux.userns import write_identity_maps

BRIDGE = "br0"
SINK = "cut0"


class Switch:
    """The bridge and one netlink socket inside each member's network namespace."""

    def __init__(self) -> None:
        self.own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.nl = Netlink()
        self.nl.add_bridge(BRIDGE)
        self.nl.set_link(BRIDGE, up=True)
        self.members: dict[str, Netlink] = {}
        self.sinks: set[str] = set()
        self.cuts: set[tuple[str, str]] = set()
        self.port = 0

    def attach(self, name: str, pid: int, address: str) -> None:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.port += 1
            port = f"p{self.port}"
            self.nl.add_veth(port, "eth0", peer_netns_fd=fd)
            self.nl.set_link(port, master=BRIDGE, up=True)
            libc.setns(fd, libc.CLONE_NEWNET)
            try:
                inside = Netlink()  # bound to the member's namespace for good
            finally:
                libc.setns(self.own, libc.CLONE_NEWNET)
        finally:
            os.close(fd)
        inside.add_address("eth0", address)
        inside.set_link("eth0", up=True)
        self.members[name] = inside

    def cut(self, name: str, peer_address: str) -> None:
        inside = self.members[name]
        if name not in self.sinks:
            inside.add_sink(SINK)
            inside.set_link(SINK, up=True)
            self.sinks.add(name)
        if (name, peer_address) not in self.cuts:
            inside.add_route(f"{peer_address}/32", dev=SINK)
            self.cuts.add((name, peer_address))

    def heal(self) -> None:
        for name, peer_address in sorted(self.cuts):
            member = self.members.get(name)
            if member is not None:
                try:
                    member.delete_route(f"{peer_address}/32", dev=SINK)
                except OSError:
                    pass  # the member has ended: its namespace and routes are gone
        self.cuts.clear()

    def detach(self, name: str) -> None:
        member = self.members.pop(name, None)
        if member is not None:
            member.close()
        self.sinks.discard(name)
        self.cuts = {c for c in self.cuts if c[0] != name}


def serve(stdin: IO[str], stdout: IO[str], userns: bool, uid: int, gid: int) -> None:
    """Become the switch: new namespaces, bridge up, then answer requests until stdin closes."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        libc.unshare(libc.CLONE_NEWNET | (libc.CLONE_NEWUSER if userns else 0))
        if userns:
            write_identity_maps(uid, gid)
        loopback_up()
        switch = Switch()
    except OSError as exc:
        stdout.write(json.dumps({"error": f"cannot create the network's namespace and bridge: {exc}", "errno": exc.errno}) + "\n")
        stdout.flush()
        return
    stdout.write(json.dumps({"ok": True}) + "\n")
    stdout.flush()
    for line in stdin:
        request: dict[str, Any] = json.loads(line)
        try:
            op = request.pop("op")
            getattr(switch, op)(**request)
            answer: dict[str, Any] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller, named
            answer = {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()

