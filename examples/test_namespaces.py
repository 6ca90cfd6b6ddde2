"""What an isolated test sees: its own PID namespace, hostname and network."""

from __future__ import annotations

import os
import socket

import pytest


def interface_names() -> set[str]:
    return {name for _index, name in socket.if_nameindex()}


@pytest.fixture(scope="module")
def host_interfaces() -> set[str]:
    # Module scope: created once in the pytest process, *before* any sandbox is forked, so it
    # records the host's view. Function-scoped fixtures, by contrast, run inside the sandbox.
    return interface_names()


@pytest.mark.isolated
def test_own_pid_namespace_and_hostname() -> None:
    # PID 1 is the sandbox's tiny init; the test itself runs as PID 2.
    assert os.getpid() == 2
    # The default hostname of a sandbox; choose another with @pytest.mark.isolated(hostname=...).
    assert socket.gethostname() == "isolated"


@pytest.mark.isolated
def test_no_network_but_loopback(host_interfaces: set[str]) -> None:
    # net="none" (the default): a fresh network namespace with only the loopback device, and it is up.
    assert interface_names() == {"lo"}
    assert interface_names() <= host_interfaces
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))  # loopback works; nothing outside is reachable
        server.listen()


@pytest.mark.isolated(net="host")
def test_host_network_when_asked(host_interfaces: set[str]) -> None:
    # net="host": the escape hatch - the host's network stack, still in its own PID namespace.
    assert interface_names() == host_interfaces
    assert os.getpid() == 2
