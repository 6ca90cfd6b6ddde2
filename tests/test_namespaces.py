"""Inside an isolated test: PID 2 under an init, its own hostname, only ``lo``, its own IPC."""

from __future__ import annotations

import pytest

from conftest import Runner


def test_pid_hostname_network_ipc(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        """
        import os, socket, subprocess, sys, pytest

        @pytest.mark.isolated
        def test_pid_namespace():
            assert os.getpid() == 2
            assert os.getppid() == 1
            with open("/proc/1/cmdline", "rb") as f:
                assert b"python" in f.read()
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            assert visible == [1, 2, child.pid], visible
            child.kill(); child.wait()

        @pytest.mark.isolated
        def test_default_hostname():
            assert socket.gethostname() == "isolated"

        @pytest.mark.isolated(hostname="node-a")
        def test_hostname_from_marker():
            assert socket.gethostname() == "node-a"
            socket.sethostname("changed")  # our own UTS namespace: the host keeps its name
            assert socket.gethostname() == "changed"

        @pytest.mark.isolated
        def test_only_loopback_and_up():
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
            with socket.socket() as server:
                server.bind(("127.0.0.1", 0)); server.listen()
                with socket.create_connection(server.getsockname(), timeout=5):
                    pass

        @pytest.mark.isolated(net="host")
        def test_host_network():
            names = [name for _, name in socket.if_nameindex()]
            assert names != ["lo"], names

        def test_not_isolated_runs_in_pytest_process():
            assert os.getpid() != 2
            assert socket.gethostname() not in ("isolated", "changed")

        @pytest.mark.isolated
        def test_ipc_namespace_is_empty():
            with open("/proc/sysvipc/shm") as f:
                assert len(f.read().splitlines()) == 1  # header only
        """
    )
    result = run("-v")
    result.assert_outcomes(passed=7)


def test_header_names_isolation_in_effect(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = run()
    result.stdout.fnmatch_lines(["isolate: * namespaces *mount+pid+network+uts+ipc+cgroup*; overlay root*"])
