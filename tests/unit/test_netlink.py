"""The rtnetlink client: its codec on bytes, and real links made inside ``unshare -Urn``.

The pytest process never unshares nor forks: each kernel scenario is one of this module's
``_scenario_*`` functions, run by ``unshare -Urn python -c`` in a subprocess. It reports what it
saw as one JSON line and the assertions happen here, where pytest can show them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from pytest_isolate.linux import libc, netlink
from pytest_isolate.linux.netlink import (
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    NLA_F_NESTED,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR_ATTR_MSG,
    RTM_NEWLINK,
    VETH_INFO_PEER,
    Message,
    Netlink,
    NetlinkError,
    ack_error,
    attr,
    attr_name,
    attr_str,
    attr_u32,
    ifinfomsg,
    message,
    nested,
    parse_attrs,
    parse_error,
    parse_messages,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MUST_WORK = os.environ.get("PYTEST_ISOLATE_MUST_WORK") == "1"

# -- the codec, on bytes only ----------------------------------------------------------------------


def test_attributes_are_padded_to_four_bytes_and_parse_back() -> None:
    raw = attr_str(IFLA_IFNAME, "eth0")  # 4 + 5 bytes, padded to 12
    assert raw == struct.pack("=HH", 9, IFLA_IFNAME) + b"eth0\0" + b"\0\0\0"
    both = raw + attr_u32(4, 1400) + attr(99, b"")
    assert parse_attrs(both) == {IFLA_IFNAME: b"eth0\0", 4: struct.pack("=I", 1400), 99: b""}


def test_nested_attributes_and_the_veth_peer_header() -> None:
    peer = attr(VETH_INFO_PEER, ifinfomsg() + attr_name("b0"))
    info = nested(IFLA_LINKINFO | NLA_F_NESTED, attr_str(IFLA_INFO_KIND, "veth"), attr(IFLA_INFO_DATA, peer))
    top = parse_attrs(ifinfomsg(7)[16:] + info)  # flag bits are masked off the type
    linkinfo = parse_attrs(top[IFLA_LINKINFO])
    assert linkinfo[IFLA_INFO_KIND] == b"veth\0"
    peer_payload = parse_attrs(linkinfo[IFLA_INFO_DATA])[VETH_INFO_PEER]
    assert len(peer_payload) % 4 == 0
    assert parse_attrs(peer_payload[16:]) == {IFLA_IFNAME: b"b0\0"}


def test_truncated_attribute_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="overruns"):
        parse_attrs(attr_str(IFLA_IFNAME, "eth0")[:7])


def test_messages_split_on_aligned_boundaries() -> None:
    first = struct.pack("=IHHII", 16 + 5, RTM_NEWLINK, 2, 7, 0) + b"abcde" + b"\0\0\0"  # length excludes padding
    data = first + message(NLMSG_DONE, 2, 7, struct.pack("=i", 0))
    got = parse_messages(data)
    assert [(m.type, m.seq, m.payload) for m in got] == [(RTM_NEWLINK, 7, b"abcde"), (NLMSG_DONE, 7, b"\0" * 4)]
    with pytest.raises(ValueError, match="overruns"):
        parse_messages(data[:-2])


def _ack(code: int, flags: int, echoed: bytes, tlvs: bytes = b"") -> Message:
    return Message(NLMSG_ERROR, flags, 5, 0, struct.pack("=i", code) + echoed + tlvs)


def test_parse_error_ack_plain_capped_and_echoed() -> None:
    request = message(RTM_NEWLINK, 0x605, 5, ifinfomsg() + attr_name("a0"))
    header = request[:16]
    reason = attr_str(NLMSGERR_ATTR_MSG, "Address already assigned")
    assert parse_error(_ack(0, NLM_F_CAPPED, header)) == (0, "")
    assert parse_error(_ack(-errno.EEXIST, 0, request)) == (errno.EEXIST, "")
    assert parse_error(_ack(-errno.EEXIST, NLM_F_CAPPED | NLM_F_ACK_TLVS, header, reason)) == (
        errno.EEXIST,
        "Address already assigned",
    )
    # Without NETLINK_CAP_ACK the whole request is echoed before the attributes.
    assert parse_error(_ack(-errno.EEXIST, NLM_F_ACK_TLVS, request, reason))[1] == "Address already assigned"


def test_ack_error_names_the_operation_and_keeps_errno() -> None:
    exc = ack_error("RTM_NEWLINK veth a0<->b0", _ack(-errno.EEXIST, NLM_F_CAPPED, b"\0" * 16))
    assert isinstance(exc, OSError) and exc.errno == errno.EEXIST
    assert str(exc) == "[Errno 17] RTM_NEWLINK veth a0<->b0: File exists"


@pytest.mark.parametrize("bad", ["", "a" * 16, "a/b", "a b", "a:0", ".."])
def test_invalid_link_names_are_refused_before_the_kernel(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid link name"):
        attr_name(bad)
    attr_name("a" * 15)


def test_addresses_and_destinations_are_checked() -> None:
    assert netlink._prefix("10.23.0.2/24", host=True) == (ipaddress.ip_address("10.23.0.2"), 24)
    with pytest.raises(ValueError, match="invalid destination '10.23.0.2/24'"):
        netlink._prefix("10.23.0.2/24", host=False)  # host bits set: like ip(8), refuse
    with pytest.raises(ValueError, match="invalid address"):
        netlink._prefix("10.23.0.300/24", host=True)


# -- scenarios: run inside `unshare -Urn`, never in the pytest process -----------------------------


def _spawn_netns() -> int:
    """Fork a child parked in a new network namespace until we exit; return an fd to it.

    The fd alone would keep the namespace alive; a process is what a sandbox will be.
    """
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(ready_r)
            os.close(hold_w)
            libc.unshare(libc.CLONE_NEWNET)
            os.write(ready_w, b"1")
            os.read(hold_r, 1)  # EOF once the parent (and any sibling forked later) has exited
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    if os.read(ready_r, 1) != b"1":
        raise RuntimeError("namespace child died before unsharing")
    os.close(ready_r)
    # hold_w stays open on purpose, for the life of this process.
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def _inside(ns_fd: int) -> Iterator[None]:
    """Run the block in another network namespace; sockets made there stay there afterwards."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    libc.setns(ns_fd, libc.CLONE_NEWNET)
    try:
        yield
    finally:
        libc.setns(home, libc.CLONE_NEWNET)
        os.close(home)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


def _tcp(ns_fd: int, dst: tuple[str, int], expect: bool = True) -> str:
    """How a TCP connect from ``ns_fd`` ends: "ok", an errno name, or "timeout". Waiting longer when
    it should get through: on links just brought up, the first ARP request or SYN can be lost, and
    each is sent again only after a second."""
    with _inside(ns_fd):
        sock = socket.socket()
    with sock:
        sock.settimeout(3.0 if expect else 1.0)
        try:
            sock.connect(dst)
        except socket.timeout:
            return "timeout"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def _udp(ns_fd: int, server: socket.socket, expect: bool) -> bool:
    """Whether one datagram from ``ns_fd`` reaches ``server`` (waiting longer when it should)."""
    with _inside(ns_fd):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.sendto(b"ping", server.getsockname())
    server.settimeout(3.0 if expect else 0.5)
    try:
        return server.recv(16) == b"ping"
    except socket.timeout:
        return False


def _scenario_partition() -> dict[str, Any]:
    ns1, ns2 = _spawn_netns(), _spawn_netns()
    out: dict[str, Any] = {}
    with Netlink() as nl:  # this process's own namespace holds the bridge
        nl.add_bridge("br0")
        nl.set_link("br0", up=True)

        t = time.perf_counter()  # pair 1: made here, peer moved, renamed and brought up at once
        nl.add_veth("h1", "p1")
        nl.set_link("h1", master="br0", up=True)
        nl.set_link("p1", netns_fd=ns1, new_name="eth0", up=True)
        with _inside(ns1), Netlink() as inner:
            inner.add_address("eth0", "10.99.0.2/24")
            inner.set_link("lo", up=True)
        out["ms_veth_moved"] = _ms(t)

        t = time.perf_counter()  # pair 2: the peer born in its namespace
        nl.add_veth("h2", "p2", peer_netns_fd=ns2)
        nl.set_link("h2", master="br0", up=True)
        with _inside(ns2), Netlink() as inner:
            inner.set_link("p2", new_name="eth0")
            inner.add_address("eth0", "10.99.0.3/24")
            inner.set_link("eth0", up=True)
            inner.set_link("lo", up=True)
            out["ns2_links"] = sorted(inner.links())
        out["ms_veth_born_there"] = _ms(t)
        out["bridge_links"] = sorted(nl.links())

    with _inside(ns1):
        udp1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp1.bind(("10.99.0.2", 7000))
    with _inside(ns2):
        udp2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp2.bind(("10.99.0.3", 7000))
        listener = socket.socket()
        listener.bind(("10.99.0.3", 7001))
        listener.listen()

    def probe(connected: bool) -> dict[str, Any]:
        return {
            "tcp": _tcp(ns1, ("10.99.0.3", 7001), expect=connected),
            "tcp_closed_port": _tcp(ns1, ("10.99.0.3", 7002), expect=connected),
            "udp_1_to_2": _udp(ns1, udp2, expect=connected),
            "udp_2_to_1": _udp(ns2, udp1, expect=connected),
        }

    out["before"] = probe(connected=True)
    t = time.perf_counter()
    for ns, other in ((ns1, "10.99.0.3/32"), (ns2, "10.99.0.2/32")):
        with _inside(ns), Netlink() as inner:
            out["sink"] = inner.add_sink("cut0")
            inner.set_link("cut0", up=True)
            inner.add_route(other, dev="cut0")
    out["ms_partition"] = _ms(t)
    out["partitioned"] = probe(connected=False)
    t = time.perf_counter()
    for ns, other in ((ns1, "10.99.0.3/32"), (ns2, "10.99.0.2/32")):
        with _inside(ns), Netlink() as inner:
            inner.delete_route(other, dev="cut0")
    out["ms_heal"] = _ms(t)
    out["healed"] = probe(connected=True)
    return out


def _failure(call: Any) -> list[Any]:
    try:
        call()
    except NetlinkError as exc:
        return [exc.errno, str(exc)]
    return [0, "no error"]


def _scenario_errors() -> dict[str, Any]:
    with Netlink() as nl:
        nl.add_veth("a0", "b0")
        return {
            "dup_veth": _failure(lambda: nl.add_veth("a0", "b0")),
            "dup_bridge": _failure(lambda: nl.add_bridge("b0")),
            "index": _failure(lambda: nl.index("nope0")),
            "set": _failure(lambda: nl.set_link("nope0", up=True)),
            "master": _failure(lambda: nl.set_link("a0", master="nope1")),
            "delete": _failure(lambda: nl.delete_link("nope0")),
            "address": _failure(lambda: nl.add_address("nope0", "10.98.0.1/24")),
            "route_dev": _failure(lambda: nl.add_route("10.98.0.0/24", dev="nope0")),
            "route_missing": _failure(lambda: nl.delete_route("10.98.0.0/24")),
            "links_before_delete": sorted(nl.links()),
            "delete_pair": _failure(lambda: nl.delete_link("b0")),
            "links_after_delete": sorted(nl.links()),
        }


def _u32(raw: bytes) -> int:
    value: int = struct.unpack("=I", raw)[0]
    return value


def _link(nl: Netlink, name: str) -> dict[str, int]:
    """MTU and master of a link, read back from a dump (the client has no getter for them)."""
    for msg in nl.dump("RTM_GETLINK dump", netlink.RTM_GETLINK, ifinfomsg()):
        attrs = parse_attrs(msg.payload[16:])
        if attrs.get(IFLA_IFNAME) == name.encode() + b"\0":
            master = attrs.get(netlink.IFLA_MASTER, bytes(4))  # absent when not enslaved
            return {"mtu": _u32(attrs[netlink.IFLA_MTU]), "master": _u32(master)}
    raise LookupError(name)


def _scenario_settings() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Netlink() as nl:
        nl.add_bridge("br0")
        nl.add_veth("a0", "b0")
        nl.set_link("a0", master="br0", mtu=1400, up=True)
        out["br0"] = nl.index("br0")
        out["enslaved"] = _link(nl, "a0")
        nl.set_link("a0", master="")
        out["released"] = _link(nl, "a0")
        nl.set_link("b0", up=True)
        nl.add_address("b0", "10.97.0.1/24")
        nl.add_route("10.96.0.0/16", gateway="10.97.0.5")
        out["dup_gateway_route"] = _failure(lambda: nl.add_route("10.96.0.0/16", gateway="10.97.0.5"))
        out["offlink_gateway"] = _failure(lambda: nl.add_route("10.95.0.0/16", gateway="10.94.0.1"))
        nl.delete_route("10.96.0.0/16")
        out["deleted_again"] = _failure(lambda: nl.delete_route("10.96.0.0/16"))
        if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
            nl.add_address("b0", "fd00::2/64")
            nl.add_route("fd01::/64", dev="b0")
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                sock.bind(("fd00::2", 0))  # at once: no duplicate detection leaves it tentative
            out["ipv6"] = _failure(lambda: nl.add_route("fd01::/64", dev="b0"))
    return out


def _scenario_sinks() -> dict[str, Any]:
    with Netlink() as nl:
        dummy = _failure(lambda: nl.add_dummy("d0"))
        sink = nl.add_sink("s0")
        netlink.SINK_KINDS = ("no-such-kind", "ifb")  # force the fallback even where dummy exists
        forced = nl.add_sink("s1")
        netlink.SINK_KINDS = ("no-such-kind",)
        unknown = _failure(lambda: nl.add_sink("s2"))
        return {"dummy": dummy, "sink": sink, "forced": forced, "unknown": unknown, "links": sorted(nl.links())}


@functools.lru_cache(maxsize=None)
def _userns_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Urn", "true"], capture_output=True, check=False).returncode == 0


def _run(scenario: str) -> dict[str, Any]:
    """Run ``scenario`` in ``unshare -Urn``: a fresh user and network namespace, unprivileged."""
    if not _userns_works():
        if MUST_WORK:
            pytest.fail("user namespaces unavailable (PYTEST_ISOLATE_MUST_WORK=1)")
        pytest.skip("user namespaces unavailable")
    code = (
        f"import sys, json; sys.path[:0] = {[str(REPO), str(HERE)]!r}; import test_netlink; "
        f"print(json.dumps(test_netlink.{scenario}()))"
    )
    proc = subprocess.run(
        ["unshare", "-Urn", sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_bridge_connects_two_namespaces_and_a_sink_route_partitions_them() -> None:
    out = _run("_scenario_partition")
    print(json.dumps({k: v for k, v in out.items() if k.startswith("ms_") or k == "sink"}))
    assert out["bridge_links"] == ["br0", "h1", "h2", "lo"]  # the peers left this namespace
    assert out["ns2_links"] == ["eth0", "lo"]
    assert out["before"] == {"tcp": "ok", "tcp_closed_port": "ECONNREFUSED", "udp_1_to_2": True, "udp_2_to_1": True}
    # A partition drops silently: connects time out (even to a closed port), nothing is refused.
    cut = {"tcp": "timeout", "tcp_closed_port": "timeout", "udp_1_to_2": False, "udp_2_to_1": False}
    assert out["partitioned"] == cut
    assert out["healed"] == out["before"]


def test_errors_carry_the_kernels_errno_and_name_the_operation() -> None:
    out = _run("_scenario_errors")
    assert out["dup_veth"] == [errno.EEXIST, "[Errno 17] RTM_NEWLINK veth a0<->b0: File exists"]
    assert out["dup_bridge"][0] == errno.EEXIST and "RTM_NEWLINK bridge b0" in out["dup_bridge"][1]
    for key in ("index", "set", "delete", "address", "route_dev"):
        assert out[key] == [errno.ENODEV, "[Errno 19] RTM_GETLINK nope0: No such device"], key
    assert out["master"][0] == errno.ENODEV and "nope1" in out["master"][1]
    assert out["route_missing"][0] == errno.ESRCH and "RTM_DELROUTE 10.98.0.0/24" in out["route_missing"][1]
    assert out["links_before_delete"] == ["a0", "b0", "lo"]
    assert out["delete_pair"] == [0, "no error"] and out["links_after_delete"] == ["lo"]  # one end takes both


def test_mtu_master_gateway_routes_and_ipv6() -> None:
    out = _run("_scenario_settings")
    assert out["enslaved"] == {"mtu": 1400, "master": out["br0"]}
    assert out["released"] == {"mtu": 1400, "master": 0}
    assert out["dup_gateway_route"][0] == errno.EEXIST
    assert out["dup_gateway_route"][1].startswith("[Errno 17] RTM_NEWROUTE 10.96.0.0/16 via 10.97.0.5: File exists")
    assert out["offlink_gateway"][0] == errno.ENETUNREACH
    assert out["deleted_again"][0] == errno.ESRCH
    if "ipv6" in out:
        assert out["ipv6"][0] == errno.EEXIST and "RTM_NEWROUTE fd01::/64 dev b0" in out["ipv6"][1]


def test_sink_is_dummy_where_the_kernel_has_it_else_ifb() -> None:
    out = _run("_scenario_sinks")
    if out["dummy"][0] == 0:
        assert out["sink"] == "dummy"
    else:  # e.g. a guest kernel built without CONFIG_DUMMY and without modules
        assert out["dummy"][0] == errno.EOPNOTSUPP and "RTM_NEWLINK dummy d0" in out["dummy"][1]
        assert out["sink"] == "ifb"
    assert out["forced"] == "ifb"
    assert out["unknown"][0] == errno.EOPNOTSUPP and "RTM_NEWLINK no-such-kind s2" in out["unknown"][1]
    assert {"s0", "s1"} <= set(out["links"])
