"""A three-node toy service that survives a network partition.

Each node keeps a counter and accepts an increment only when a majority of the nodes (itself
included) acknowledges it. Cut one node off: the other two still make progress, the lone node
refuses writes instead of diverging; heal, and it works again.
"""

from __future__ import annotations

import sys
from typing import Iterator

import pytest

from pytest_isolate import Sandbox, SandboxProcess

NODE = r'''
import socket, sys, threading
peers = sys.argv[1:]
count = 0
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 9000)); srv.listen()
def serve():
    global count
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.recv(16); count += 1; conn.sendall(b"ack")
threading.Thread(target=serve, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:                      # each line: one write request from the test
    acks = 1                                # our own vote
    for peer in peers:
        try:
            with socket.create_connection((peer, 9000), timeout=0.5) as c:
                c.sendall(b"inc"); acks += c.recv(16) == b"ack"
        except OSError:
            pass
    ok = acks * 2 > len(peers) + 1
    count += ok
    print("committed" if ok else "refused: no majority", flush=True)
'''

NAMES = ("a", "b", "c")


@pytest.fixture
def cluster(sandbox: Sandbox) -> Iterator[tuple[object, dict[str, SandboxProcess]]]:
    net = sandbox.network()
    nodes = {}
    for name in NAMES:
        peers = [n for n in NAMES if n != name]
        nodes[name] = sandbox.popen([sys.executable, "-c", NODE, *peers], network=net, hostname=name,
                                    stdin=-1, stdout=-1)
    for node in nodes.values():
        assert node.stdout.readline() == b"ready\n"
    yield net, nodes


def write(node: SandboxProcess) -> str:
    node.stdin.write(b"inc\n")
    node.stdin.flush()
    return node.stdout.readline().decode().strip()


def test_majority_survives_a_partition(cluster) -> None:
    net, nodes = cluster
    assert write(nodes["a"]) == "committed"
    net.partition(nodes["a"], [nodes["b"], nodes["c"]])      # cut a off from b and c
    assert write(nodes["a"]) == "refused: no majority"        # the minority must not diverge
    assert write(nodes["b"]) == "committed"                    # the majority keeps working
    net.heal()
    assert write(nodes["a"]) == "committed"
