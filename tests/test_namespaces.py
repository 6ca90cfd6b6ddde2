"""Inside an isolated test: PID 2 under an init, its own hostname, only ``lo``, its own IPC."""

from __future__ import annotations

import os
import platform

import pytest

from conftest import Runner


@pytest.mark.parametrize("join", ["pidfd", "ns-files", "python-init", "forked-relay"])
def test_pid_hostname_network_ipc(pytester: pytest.Pytester, run: Runner, join: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of joining the sandbox: one setns on a pidfd (Linux >= 5.8), and one
    /proc/PID/ns file per namespace (older kernels; forced here); as root, both inits: the
    factory's tinyinit and (forced here, as on machines without one) a forked Python init; and
    rootless, both relays: the native one (where there is one) and a forked Python relay."""
    if join == "ns-files":
        pytester.makeconftest("import pytest_isolate.linux.nsjoin as nsjoin\nnsjoin.PIDFD_SETNS = False\n")
    if join == "python-init":
        monkeypatch.setenv("PYTEST_ISOLATE_TINYINIT", "0")
    if join == "forked-relay":
        monkeypatch.setenv("PYTEST_ISOLATE_NATIVE_RELAY", "0")
    # tinyinit, root and rootless, unless this parameter (or the whole run) asks for the Python init
    tiny = platform.machine() == "x86_64" and join != "python-init" and os.environ.get("PYTEST_ISOLATE_TINYINIT") != "0"
    pytester.makepyfile(
        """
        import os, signal, socket, subprocess, sys, time, pytest

        TINYINIT = %s

        def ppid(pid):
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])

        @pytest.mark.isolated
        def test_pid_namespace():
            assert os.getpid() == 2
            assert os.getppid() == 0  # our parent is the supervisor, outside the namespace
            with open("/proc/1/cmdline", "rb") as f:
                assert b"pytest_isolate" in f.read()  # PID 1 is the sandbox's init
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            assert visible == [1, 2, child.pid], visible
            child.kill(); child.wait()

        @pytest.mark.isolated
        def test_init_is_in_the_sandbox_root():
            # its cwd and root, readable through /proc/1, would otherwise lead out of the copy-on-write root
            assert os.path.samefile("/proc/1/root", "/") and os.path.samefile("/proc/1/cwd", "/")
            with open("/proc/1/comm") as f:
                assert (f.read().strip() == "pytest_isolate") == TINYINIT  # tinyinit names itself so

        @pytest.mark.isolated
        def test_init_adopts_and_reaps_orphans():
            read, write = os.pipe()
            middle = os.fork()
            if middle == 0:
                orphan = os.fork()
                if orphan == 0:
                    os.close(read); os.close(write)
                    os._exit(0)            # exits once adopted: only a reaping PID 1 removes it
                os.write(write, str(orphan).encode()); os._exit(0)
            os.close(write)
            orphan = int(os.read(read, 20)); os.waitpid(middle, 0)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not os.path.exists(f"/proc/{orphan}"), "PID 1 did not reap the orphan"

        @pytest.mark.isolated
        def test_init_forwards_signals_to_pid_2():
            forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            got = []
            for sig in forwarded:
                signal.signal(sig, lambda signum, frame: got.append(signum))
            for sig in forwarded:
                os.kill(1, sig)
            deadline = time.monotonic() + 10
            while len(got) < len(forwarded) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sorted(got) == sorted(forwarded)

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
        """ % tiny
    )
    result = run("-v")
    result.assert_outcomes(passed=10)


@pytest.mark.parametrize("relay", ["native", "forked"])
def test_the_test_process_is_like_any_fork_of_pytest(pytester: pytest.Pytester, run: Runner, relay: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """However a relay made it (user_namespace=True: also as root), the test process is what
    os.fork() makes: fork hooks run in it, pytest's signal mask, rseq registered (the kernel
    drops it for the native relay's CLONE_VM clone), threads work, its own name. The native relay
    runs the hooks once, in the test process only; a forked relay, a fork itself, runs
    ``after_in_child`` in the relay too."""
    hooks = "[2]"
    if relay == "forked":
        monkeypatch.setenv("PYTEST_ISOLATE_NATIVE_RELAY", "0")
        hooks = "conftest.AFTER_IN_CHILD[:-1] + [2]"
    pytester.makeconftest(
        """
        import os, threading
        AFTER_IN_CHILD = []
        os.register_at_fork(after_in_child=lambda: AFTER_IN_CHILD.append(os.getpid()))

        def churn():  # glibc's fork then locks malloc's arenas around the fork (multi-threaded)
            while True:
                [bytearray(200_000) for _ in range(4)]

        threading.Thread(target=churn, daemon=True).start()
        """
    )
    pytester.makepyfile(
        """
        import ctypes, errno, os, signal, threading, pytest
        import conftest

        @pytest.mark.isolated(user_namespace=True)
        def test_fork_like():
            assert os.getpid() == 2
            assert conftest.AFTER_IN_CHILD == %s
            assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()
            with open("/proc/self/comm") as f:
                assert f.read().strip() != "isolate-relay"
            box = []
            worker = threading.Thread(target=lambda: box.append(threading.get_ident()))
            worker.start(); worker.join()
            assert box and box[0] != threading.get_ident()

        @pytest.mark.isolated(user_namespace=True)
        def test_rseq_registered():
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                offset = ctypes.c_long.in_dll(libc, "__rseq_offset").value
                size = ctypes.c_uint.in_dll(libc, "__rseq_size").value
            except ValueError:
                pytest.skip("glibc before 2.35: no rseq")
            if not size:
                pytest.skip("rseq is off in glibc")
            libc.pthread_self.restype = ctypes.c_void_p
            libc.syscall.restype = ctypes.c_long
            area = ctypes.c_void_p(libc.pthread_self() + offset)
            again = libc.syscall(ctypes.c_long(334), area, ctypes.c_uint(max(size, 32)), 0, ctypes.c_uint(0x53053053))
            assert again == -1 and ctypes.get_errno() == errno.EBUSY

        @pytest.mark.isolated(user_namespace=True)
        @pytest.mark.parametrize("n", range(20))
        def test_many_beside_a_busy_thread(n):
            assert bytearray(1 << 20)[-1] == 0 and os.getpid() == 2
        """ % hooks
    )
    result = run("-v")
    result.assert_outcomes(passed=22)


@pytest.mark.parametrize("relay", ["native", "forked"])
def test_a_relay_that_cannot_join_is_a_setup_error(pytester: pytest.Pytester, run: Runner, relay: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed setns in the relay (forced here: a descriptor that is no namespace) fails the test
    in setup, naming the step and the errno, and the run goes on."""
    if relay == "forked":
        monkeypatch.setenv("PYTEST_ISOLATE_NATIVE_RELAY", "0")
    pytester.makeconftest(
        """
        import os
        from pytest_isolate.linux import nsjoin

        NOT_A_NAMESPACE = os.open(os.devnull, os.O_RDONLY)
        nsjoin.Namespaces.pairs = lambda self, flags: [(NOT_A_NAMESPACE, flags)]
        real_join = nsjoin.Namespaces.join

        def join(self, flags):
            if flags & 0x10000000:  # the relay's join of the user namespace and the rest
                from pytest_isolate.linux import libc
                libc.setns(NOT_A_NAMESPACE, flags)
            real_join(self, flags)

        nsjoin.Namespaces.join = join
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated(user_namespace=True)
        def test_never_runs():
            pass

        def test_after():
            pass
        """
    )
    result = run("-rE")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*setns*Invalid argument*"])


def test_header_names_isolation_in_effect(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = run()
    result.stdout.fnmatch_lines(["isolate: * namespaces *mount+pid+network+uts+ipc+cgroup*; overlay root*"])
