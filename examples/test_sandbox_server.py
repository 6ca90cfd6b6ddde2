"""A server fixture in a sandbox: the server gets its own PID and mount namespaces, a copy-on-write
root and its own accounting, and is killed with its whole sandbox at teardown, even if the test fails.
"""

from __future__ import annotations

import socket
import sys
import time
import urllib.request
from typing import Iterator

import pytest

from pytest_isolate import Sandbox, SandboxProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def web_server(sandbox: Sandbox, tmp_path) -> Iterator[tuple[SandboxProcess, int]]:
    (tmp_path / "index.html").write_text("hello from the sandbox\n")
    port = free_port()
    # net="host": the test (on the host) can reach it; everything else stays isolated
    server = sandbox.popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                           net="host", cwd=str(tmp_path), stdout=-3, stderr=-3)  # -3: subprocess.DEVNULL
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.05)
    yield server, port
    # nothing to do: the sandbox fixture kills the server and removes its sandbox


def test_serves_the_page(web_server: tuple[SandboxProcess, int]) -> None:
    server, port = web_server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as page:
        assert page.read() == b"hello from the sandbox\n"
    assert server.poll() is None
    print(f"server pid {server.pid}, {server.usage().memory_peak / 2**20:.1f} MiB at peak so far")
