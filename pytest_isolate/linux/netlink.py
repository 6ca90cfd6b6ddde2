"""A minimal rtnetlink client: links, addresses and routes, with only ``socket`` and ``struct``.

Private networks between sandboxes need a bridge, veth pairs, dummies and routes; shelling out
to ``ip`` adds a dependency and a fork per step, pyroute2 a large one. Everything acts on the
network namespace the socket was opened in (the calling thread's, at ``Netlink()``), so callers
``setns`` first. It works inside an unprivileged user namespace: rtnetlink checks CAP_NET_ADMIN
against the user namespace owning the network namespace, which ``unshare -Urn`` gives us.

Every request carries NLM_F_ACK and waits for its ack, so a failure surfaces as a
:class:`NetlinkError` at the call that caused it, naming the operation and the link.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import NamedTuple, Optional, Union

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # the ack echoes only the header of our request, not all of it
NETLINK_EXT_ACK = 11  # the ack may carry the kernel's reason as text

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_CAPPED = 0x100  # in an ack: the request was not echoed
NLM_F_ACK_TLVS = 0x200  # in an ack: extended-ack attributes follow
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTM_DELROUTE = 25

IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFNAMSIZ = 16
IFF_UP = 0x1
SINK_KINDS: tuple[str, ...] = ("dummy", "ifb")  # kinds that drop what they are sent, preferred first

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFA_F_NODAD = 0x02

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5

RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RTN_UNICAST = 1

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_ERROR = struct.Struct("=i")

_RECV_SIZE = 1 << 16  # above the kernel's largest dump skb (32 KiB), so nothing is truncated

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class NetlinkError(OSError):
    """The kernel refused a request: ``errno`` is the kernel's, the message names the operation."""


class Message(NamedTuple):
    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, zero-padded to 4 bytes (the length field excludes the padding)."""
    head = _NLATTR.pack(_NLATTR.size + len(payload), kind)
    return head + payload + b"\0" * (_align(len(payload)) - len(payload))


def attr_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute, as iproute2 sends names."""
    return attr(kind, value.encode() + b"\0")


def attr_name(name: str) -> bytes:
    """IFLA_IFNAME, checked here: the kernel's ERANGE "failed policy validation" names nothing."""
    bad = name in (".", "..") or any(c in "/:" or c.isspace() for c in name)
    if bad or not 0 < len(name.encode()) < IFNAMSIZ:
        raise ValueError(f"invalid link name {name!r}: 1 to {IFNAMSIZ - 1} bytes, no '/', ':' or whitespace")
    return attr_str(IFLA_IFNAME, name)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def nested(kind: int, *attrs: bytes) -> bytes:
    """An attribute whose payload is more attributes (or a header then attributes)."""
    return attr(kind, b"".join(attrs))


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (flag bits masked off); a truncated tail raises ValueError."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size or pos + length > len(data):
            raise ValueError(f"netlink attribute of length {length} at offset {pos} overruns {len(data)} bytes")
        out[kind & NLA_TYPE_MASK] = data[pos + _NLATTR.size : pos + length]
        pos += _align(length)
    return out


def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    """One netlink message: header plus payload (already 4-byte aligned by its builders)."""
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload


def parse_messages(data: bytes) -> list[Message]:
    """Split one datagram into its messages; the kernel packs a dump's many into one."""
    out: list[Message] = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            raise ValueError(f"netlink message of length {length} at offset {pos} overruns {len(data)} bytes")
        out.append(Message(kind, flags, seq, pid, data[pos + _NLMSGHDR.size : pos + length]))
        pos += _align(length)
    return out


def parse_error(msg: Message) -> tuple[int, str]:
    """An NLMSG_ERROR's (errno, kernel's extended-ack text or ""); errno 0 is a plain ack."""
    (code,) = _ERROR.unpack_from(msg.payload)
    rest = msg.payload[_ERROR.size :]
    text = ""
    if msg.flags & NLM_F_ACK_TLVS:
        # struct nlmsgerr echoes our header, and all of our request unless capped.
        echoed = _NLMSGHDR.size
        if not msg.flags & NLM_F_CAPPED:
            echoed = _NLMSGHDR.unpack_from(rest)[0]
        raw = parse_attrs(rest[_align(echoed) :]).get(NLMSGERR_ATTR_MSG, b"")
        text = raw.rstrip(b"\0").decode(errors="replace")
    return -code, text


def ack_error(what: str, msg: Message) -> NetlinkError:
    """The error for a failed request: "RTM_NEWLINK veth a0<->b0: File exists (kernel's reason)"."""
    code, text = parse_error(msg)
    return NetlinkError(code, f"{what}: {os.strerror(code)}" + (f" ({text})" if text else ""))


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def _prefix(cidr: str, *, host: bool) -> tuple[IPAddress, int]:
    """Parse "10.23.0.2/24" (an address on a link) or "10.23.0.0/24" (a route's destination)."""
    try:
        if host:
            iface = ipaddress.ip_interface(cidr)
            return iface.ip, iface.network.prefixlen
        net = ipaddress.ip_network(cidr)
    except ValueError as exc:
        raise ValueError(f"invalid {'address' if host else 'destination'} {cidr!r}: {exc}") from None
    return net.network_address, net.prefixlen


def _family(ip: IPAddress) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


class Netlink:
    """One NETLINK_ROUTE socket bound to the network namespace current at construction."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self._sock.bind((0, 0))
            for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                try:
                    self._sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass  # kernels before 4.3/4.12: plain acks, still correct
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------

    def _send(self, kind: int, flags: int, payload: bytes) -> int:
        self._seq += 1
        self._sock.send(message(kind, NLM_F_REQUEST | flags, self._seq, payload))
        return self._seq

    def _recv(self) -> list[Message]:
        data, _, msg_flags, _ = self._sock.recvmsg(_RECV_SIZE)
        if msg_flags & socket.MSG_TRUNC:
            raise NetlinkError(errno.EMSGSIZE, f"netlink reply larger than {_RECV_SIZE} bytes")
        return parse_messages(data)

    def request(self, what: str, kind: int, payload: bytes, flags: int = 0) -> None:
        """Send one request with NLM_F_ACK and wait for its ack; ``what`` names it in errors."""
        seq = self._send(kind, flags | NLM_F_ACK, payload)
        while True:
            for msg in self._recv():
                if msg.seq != seq or msg.type != NLMSG_ERROR:
                    continue  # a stale reply to an earlier, interrupted request
                if parse_error(msg)[0]:
                    raise ack_error(what, msg)
                return

    def dump(self, what: str, kind: int, payload: bytes) -> list[Message]:
        """A NLM_F_DUMP request's replies, gathered over datagrams until NLMSG_DONE."""
        seq = self._send(kind, NLM_F_DUMP, payload)
        out: list[Message] = []
        while True:
            for msg in self._recv():
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_ERROR:
                    raise ack_error(what, msg)
                if msg.type == NLMSG_DONE:
                    code = -_ERROR.unpack_from(msg.payload)[0] if len(msg.payload) >= _ERROR.size else 0
                    if code:
                        raise NetlinkError(code, f"{what}: {os.strerror(code)}")
                    if msg.flags & NLM_F_DUMP_INTR:
                        raise NetlinkError(errno.EAGAIN, f"{what}: dump interrupted by a concurrent change")
                    return out
                if msg.type != NLMSG_NOOP:
                    out.append(msg)

    # -- links -----------------------------------------------------------------------------------

    def index(self, name: str) -> int:
        """The link's index in *this socket's* namespace (if_nametoindex would use the thread's)."""
        payload = ifinfomsg() + attr_name(name)
        seq = self._send(RTM_GETLINK, 0, payload)
        while True:
            for msg in self._recv():
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_ERROR:
                    raise ack_error(f"RTM_GETLINK {name}", msg)
                if msg.type == RTM_NEWLINK:
                    return int(_IFINFOMSG.unpack_from(msg.payload)[2])

    def links(self) -> dict[str, int]:
        """Every link of the namespace, name -> index."""
        out: dict[str, int] = {}
        for msg in self.dump("RTM_GETLINK dump", RTM_GETLINK, ifinfomsg()):
            if msg.type != RTM_NEWLINK:
                continue
            index = _IFINFOMSG.unpack_from(msg.payload)[2]
            name = parse_attrs(msg.payload[_IFINFOMSG.size :]).get(IFLA_IFNAME, b"")
            out[name.rstrip(b"\0").decode()] = index
        return out

    def _new_link(self, what: str, name: str, kind: str, data: bytes = b"") -> None:
        info = attr_str(IFLA_INFO_KIND, kind) + (attr(IFLA_INFO_DATA, data) if data else b"")
        payload = ifinfomsg() + attr_name(name) + nested(IFLA_LINKINFO, info)
        self.request(what, RTM_NEWLINK, payload, NLM_F_CREATE | NLM_F_EXCL)

    def add_link(self, name: str, kind: str) -> None:
        """A link of a kind that needs no IFLA_INFO_DATA ("dummy", "ifb", "bridge", ...)."""
        self._new_link(f"RTM_NEWLINK {kind} {name}", name, kind)

    def add_bridge(self, name: str) -> None:
        """A bridge; STP is off by default, so ports forward as soon as they are up."""
        self.add_link(name, "bridge")

    def add_dummy(self, name: str) -> None:
        """A link that drops all it is sent: routing a peer into it makes a silent partition."""
        self.add_link(name, "dummy")

    def add_sink(self, name: str) -> str:
        """A NOARP link that silently drops what is routed into it; returns the kind used.

        "dummy" where the kernel has it; else "ifb", which drops any packet not redirected to it
        by tc. Kernels built without CONFIG_DUMMY and without modules (some VM guests) answer
        EOPNOTSUPP "Unknown device type" for dummy. ``blackhole`` routes are no substitute:
        locally sent packets fail at once with EINVAL instead of vanishing.
        """
        *preferred, last = SINK_KINDS
        for kind in preferred:
            try:
                self.add_link(name, kind)
                return kind
            except NetlinkError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
        self.add_link(name, last)
        return last

    def add_veth(self, name: str, peer: str, peer_netns_fd: Optional[int] = None) -> None:
        """A veth pair; with ``peer_netns_fd`` the peer is born in that namespace (no move needed)."""
        peer_attrs = attr_name(peer)
        if peer_netns_fd is not None:
            peer_attrs += attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
        # VETH_INFO_PEER holds a whole ifinfomsg then the peer's own IFLA_* attributes.
        peer_info = attr(VETH_INFO_PEER, ifinfomsg() + peer_attrs)
        self._new_link(f"RTM_NEWLINK veth {name}<->{peer}", name, "veth", peer_info)

    def set_link(
        self,
        name: str,
        *,
        up: Optional[bool] = None,
        master: Optional[str] = None,
        netns_fd: Optional[int] = None,
        new_name: Optional[str] = None,
        mtu: Optional[int] = None,
    ) -> None:
        """Change a link in one request; ``master=""`` releases it from its bridge.

        The link is addressed by index, resolved first: one request can then move it to
        ``netns_fd``, rename it there and bring it up (the kernel moves before it renames and
        sets flags). Later changes need a Netlink opened in the target namespace: the name no
        longer resolves here. Moving costs ~15 ms of RCU grace periods, creating a veth peer
        in place (``add_veth(peer_netns_fd=...)``) well under 1 ms.
        """
        index = self.index(name)
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        attrs = b""
        if master is not None:
            attrs += attr_u32(IFLA_MASTER, self.index(master) if master else 0)
        if mtu is not None:
            attrs += attr_u32(IFLA_MTU, mtu)
        if new_name is not None:
            attrs += attr_name(new_name)
        if netns_fd is not None:
            attrs += attr_u32(IFLA_NET_NS_FD, netns_fd)
        self.request(f"RTM_SETLINK {name}", RTM_SETLINK, ifinfomsg(index, flags, change) + attrs)

    def delete_link(self, name: str) -> None:
        """Delete a link; deleting one end of a veth pair deletes both."""
        self.request(f"RTM_DELLINK {name}", RTM_DELLINK, ifinfomsg(self.index(name)))

    # -- addresses and routes --------------------------------------------------------------------

    def add_address(self, name: str, cidr: str) -> None:
        """Add "10.23.0.2/24" (or an IPv6 one, without duplicate detection so it is usable at once)."""
        ip, prefixlen = _prefix(cidr, host=True)
        if ip.version == 4:
            attrs, flags = attr(IFA_LOCAL, ip.packed) + attr(IFA_ADDRESS, ip.packed), 0
            if prefixlen < 31:
                attrs += attr(IFA_BROADCAST, ipaddress.ip_network(cidr, strict=False).broadcast_address.packed)
        else:
            attrs, flags = attr(IFA_ADDRESS, ip.packed), IFA_F_NODAD
        head = _IFADDRMSG.pack(_family(ip), prefixlen, flags, RT_SCOPE_UNIVERSE, self.index(name))
        self.request(f"RTM_NEWADDR {name} {cidr}", RTM_NEWADDR, head + attrs, NLM_F_CREATE | NLM_F_EXCL)

    def _route(self, kind: int, dst_cidr: str, dev: Optional[str], gateway: Optional[str]) -> bytes:
        dst, dst_len = _prefix(dst_cidr, host=False)
        family = _family(dst)
        attrs = attr(RTA_DST, dst.packed) if dst_len else b""
        if dev is not None:
            attrs += attr_u32(RTA_OIF, self.index(dev))
        if gateway is not None:
            gw = ipaddress.ip_address(gateway)
            if gw.version != dst.version:
                raise ValueError(f"gateway {gateway} is not of the family of {dst_cidr}")
            attrs += attr(RTA_GATEWAY, gw.packed)
        if kind == RTM_DELROUTE:
            # As iproute2: scope NOWHERE and no protocol/type match whatever route is there.
            head = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, 0, RT_SCOPE_NOWHERE, 0, 0)
        else:
            scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
            head = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        return head + attrs

    def add_route(self, dst_cidr: str, *, dev: Optional[str] = None, gateway: Optional[str] = None) -> None:
        """Route ``dst_cidr`` (a network, host bits clear) out of ``dev`` and/or via ``gateway``."""
        via = "".join(f" {k} {v}" for k, v in (("dev", dev), ("via", gateway)) if v is not None)
        payload = self._route(RTM_NEWROUTE, dst_cidr, dev, gateway)
        self.request(f"RTM_NEWROUTE {dst_cidr}{via}", RTM_NEWROUTE, payload, NLM_F_CREATE | NLM_F_EXCL)

    def delete_route(self, dst_cidr: str, *, dev: Optional[str] = None) -> None:
        """Delete the main-table route to ``dst_cidr`` (only the one out of ``dev``, if given)."""
        via = f" dev {dev}" if dev is not None else ""
        self.request(f"RTM_DELROUTE {dst_cidr}{via}", RTM_DELROUTE, self._route(RTM_DELROUTE, dst_cidr, dev, None))
