"""The Sandbox API through the ``sandbox`` fixture: run, popen, call, errors, cleanup.

Every sandbox is made in a ``runpytest_subprocess`` child; this process only reads the results.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import Runner


def _leftovers(marker: str) -> list[str]:
    """Host processes whose command line contains ``marker`` (none may survive a sandbox)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


RUN_BASICS = f"""
import os, signal, sys
import pytest
from pytest_isolate import ExecFailed, SandboxRunError, SpecError

PY = {sys.executable!r}

def test_result(sandbox):
    r = sandbox.run(["sh", "-c", "echo out; echo err >&2; hostname; echo $$; exit 3"])
    assert (r.returncode, r.exit_code, r.signal) == (3, 3, None)
    assert r.stdout.split() == [b"out", b"sandbox", b"2"]  # own hostname, PID 2 under the init
    assert r.stderr == b"err\\n"
    assert not r.timed_out and not r.oom_killed
    assert r.usage.wall > 0 and r.usage.sources["wall"] == "wall clock"

def test_input_text_env_cwd(sandbox, tmp_path):
    r = sandbox.run(["cat"], input=b"x" * 300000)
    assert r.stdout == b"x" * 300000
    r = sandbox.run(["sh", "-c", "echo $GREETING; pwd"], env={{"GREETING": "hi", "PATH": "/usr/bin:/bin"}},
                    cwd=str(tmp_path), text=True)
    assert r.stdout.split() == ["hi", str(tmp_path)]

def test_signal_is_a_negative_returncode(sandbox):
    r = sandbox.run(["sh", "-c", "kill -SEGV $$"])
    assert (r.returncode, r.signal, r.exit_code) == (-signal.SIGSEGV, signal.SIGSEGV, None)

def test_check_raises_with_command_exit_usage_and_stderr_tail(sandbox):
    with pytest.raises(SandboxRunError) as info:
        sandbox.run(["sh", "-c", "for i in $(seq 1 40); do echo line$i >&2; done; exit 7"], check=True)
    text = str(info.value)
    assert "exit status 7" in text and "'sh'" in text and "usage: peak memory" in text
    assert "line40" in text and "line21" in text and "line20" not in text  # the last 20 lines
    assert info.value.returncode == 7  # a CalledProcessError too

def test_missing_executable_fails_before_anything_starts(sandbox):
    with pytest.raises(ExecFailed, match="executable 'no-such-program' not found on PATH"):
        sandbox.run(["no-such-program"])

def test_unknown_option_is_named(sandbox):
    with pytest.raises(SpecError, match="unknown option colour"):
        sandbox.run(["true"], colour="red")
    with pytest.raises(SpecError, match="memory='1Q'.*unknown unit Q"):
        sandbox.run(["true"], memory="1Q")

def test_only_loopback_and_fresh_pids(sandbox):
    r = sandbox.run(["cat", "/proc/net/dev"], text=True)
    assert sorted(line.split(":")[0].strip() for line in r.stdout.splitlines()[2:]) == ["lo"]
    r = sandbox.run(["sh", "-c", "ls /proc | grep -c '^[0-9]'"], text=True)
    assert int(r.stdout) <= 4  # init, sh, ls, grep

def test_writes_vanish_but_writable_stays(sandbox, tmp_path):
    home = os.path.expanduser("~")
    target = "/etc/pytest-isolate-probe" if os.getuid() == 0 else os.path.join(home, "pytest-isolate-probe")
    r = sandbox.run(["sh", "-c", f"echo x > {{target}} && cat {{target}}"], text=True)
    assert r.returncode == 0 and r.stdout == "x\\n"
    assert not os.path.exists(target)
    r = sandbox.run(["sh", "-c", f"echo kept > {{tmp_path}}/file"], writable=[str(tmp_path)])
    assert (tmp_path / "file").read_text() == "kept\\n"

def test_python_in_a_sandbox(sandbox):
    r = sandbox.run([PY, "-c", "import os, socket; print(os.getpid(), socket.gethostname())"], text=True, hostname="box1")
    assert r.stdout.split() == ["2", "box1"]
"""


def test_run(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(RUN_BASICS)
    result = run("-v")
    result.assert_outcomes(passed=9)


def test_run_kills_what_the_program_left_behind(pytester: pytest.Pytester, run: Runner) -> None:
    marker = "987654.321"
    pytester.makepyfile(f"""
        def test_daemon(sandbox):
            r = sandbox.run(["sh", "-c", "setsid sleep {marker} >/dev/null 2>&1 < /dev/null & echo started"])
            assert r.stdout == b"started\\n"
        """)
    run().assert_outcomes(passed=1)
    assert _leftovers(marker) == []


POPEN = f"""
import signal, sys, time
import pytest
from pytest_isolate import TimeoutExpired

PY = {sys.executable!r}
SERVER = "import sys, time\\nprint('ready', flush=True)\\nx = bytearray(30 * 2**20)\\nfor i in range(len(x) // 4096): x[i*4096] = 1\\ntime.sleep(1000)"

def test_server_lifecycle(sandbox):
    proc = sandbox.popen([PY, "-c", SERVER], stdout=-1)
    assert proc.stdout.readline() == b"ready\\n"
    assert proc.poll() is None and proc.returncode is None and proc.pid > 0
    with pytest.raises(TimeoutExpired):
        proc.wait(timeout=0.2)
    deadline = time.monotonic() + 10
    while (proc.usage().memory_peak or 0) < 30 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.usage().memory_peak >= 30 * 2**20, proc.usage()
    proc.terminate()
    assert proc.wait(timeout=10) == -signal.SIGTERM

def test_communicate(sandbox):
    proc = sandbox.popen(["sh", "-c", "cat; echo done >&2"], stdin=-1, stdout=-1, stderr=-1)
    assert proc.communicate(b"abc", timeout=10) == (b"abc", b"done\\n")
    assert proc.returncode == 0

def test_left_running_by_a_failing_test(sandbox):
    import os
    with open("pytest-pid.txt", "w") as f:
        f.write(str(os.getpid()))
    sandbox.popen(["sleep", "{{marker}}"])
    assert False, "fails with a server still running"
"""


def test_popen(pytester: pytest.Pytester, run: Runner) -> None:
    marker = "876543.21"
    pytester.makepyfile(POPEN.replace("{marker}", marker))
    result = run("-v")
    result.assert_outcomes(passed=2, failed=1)
    assert _leftovers(marker) == []
    prefix = f"pytest-isolate-{(pytester.path / 'pytest-pid.txt').read_text()}-"
    cgroups = [os.path.join(d, n) for d, names, _ in os.walk("/sys/fs/cgroup") for n in names if n.startswith(prefix)]
    assert cgroups == []  # every leaf and the session of the inner pytest are gone


CALL = """
import os, socket, signal
import pytest
from pytest_isolate import SandboxCallError

def where():
    return os.getpid(), socket.gethostname()

def fails():
    raise KeyError("deep inside")

def test_returns(sandbox):
    assert sandbox.call(where) == (2, "sandbox")
    assert sandbox.call(lambda a, b=0: a + b, 2, b=3) == 5

def test_reraises_with_the_remote_traceback(sandbox):
    with pytest.raises(KeyError, match="deep inside") as info:
        sandbox.call(fails)
    assert isinstance(info.value.__cause__, SandboxCallError)
    assert "in fails" in str(info.value.__cause__) and "raise KeyError" in str(info.value.__cause__)

def test_crash_is_named(sandbox):
    with pytest.raises(SandboxCallError, match="crashed with SIGSEGV"):
        sandbox.call(os.kill, 2, signal.SIGSEGV)
    with pytest.raises(SandboxCallError, match="exit status 4"):
        sandbox.call(os._exit, 4)

def test_unpicklable_result(sandbox):
    with pytest.raises(SandboxCallError, match="cannot be pickled"):
        sandbox.call(lambda: (lambda: 1))
"""


def test_call(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(CALL)
    run("-v").assert_outcomes(passed=4)


LIMITS = f"""
import sys
import pytest
from pytest_isolate import SandboxRunError

PY = {sys.executable!r}
HOG = "x = bytearray(200 * 2**20)\\nfor i in range(0, len(x), 4096): x[i] = 1"

def test_memory(sandbox):
    r = sandbox.run([PY, "-c", HOG], memory="64M")
    assert r.oom_killed and r.returncode < 0
    assert r.usage.oom_kills >= 1 and r.usage.memory_peak <= 66 * 2**20
    with pytest.raises(SandboxRunError, match=r"OOM-killed: memory limit 64.0 MiB reached"):
        r.check_returncode()

def test_timeout_kills_every_process(sandbox):
    r = sandbox.run(["sh", "-c", "sleep 100 & sleep 100"], timeout=0.5)
    assert r.timed_out and r.returncode == -9
    assert 0.5 <= r.usage.wall < 5

def test_pids(sandbox):
    r = sandbox.run(["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait"], pids=5)
    assert r.returncode != 0 and b"fork" in r.stderr.lower(), r

def test_cpu_accounting(sandbox):
    r = sandbox.run([PY, "-c", "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.5: pass"], cpus=1)
    assert 0.4 <= r.usage.cpu_user + r.usage.cpu_system <= 1.2
    assert r.usage.sources["cpu_user"] == "cgroup"
"""


def test_limits(pytester: pytest.Pytester, run: Runner, cgroups_ok: bool) -> None:
    pytester.makepyfile(LIMITS)
    result = run("-v")
    if cgroups_ok:
        result.assert_outcomes(passed=4)
        return
    # rootless on cgroup v1: limits cannot be enforced; the default policy fails naming the cause
    result.assert_outcomes(failed=3, passed=1)
    result.stdout.fnmatch_lines(["*IsolationUnavailable: cgroup limits (memory/cpus/pids) cannot be enforced here*Fix:*"])


def test_limits_policy_skip(pytester: pytest.Pytester, run: Runner, cgroups_ok: bool) -> None:
    if cgroups_ok:
        pytest.skip("cgroup limits work here: the refusal path is tested where they do not (rootless, cgroup v1)")
    pytester.makepyfile(LIMITS)
    result = run("-v", "-rs", "--isolate-unavailable=skip")
    result.assert_outcomes(skipped=3, passed=1)
    result.stdout.fnmatch_lines(["*SKIPPED*cgroup limits (memory/cpus/pids) cannot be enforced here*"])


NETWORK = f"""
import sys
import pytest

PY = {sys.executable!r}
NODE = '''
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 7000)); srv.listen()
def serve():
    while True:
        c, _ = srv.accept(); c.sendall(socket.gethostname().encode()); c.close()
threading.Thread(target=serve, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    try:
        c = socket.create_connection((line.strip(), 7000), timeout=1)
        print(c.recv(64).decode(), flush=True)
    except OSError as e:  # socket.timeout is TimeoutError from 3.10 on, its own class before
        print("TimeoutError" if isinstance(e, (socket.timeout, TimeoutError)) else type(e).__name__, flush=True)
'''

def ask(node, peer):
    node.stdin.write(peer.encode() + b"\\n"); node.stdin.flush()
    return node.stdout.readline().decode().strip()

def test_three_nodes_partition_and_heal(sandbox):
    net = sandbox.network()
    a, b, c = (sandbox.popen([PY, "-c", NODE], network=net, hostname=n, stdin=-1, stdout=-1) for n in ("a", "b", "c"))
    for node in (a, b, c):
        assert node.stdout.readline() == b"ready\\n"
    assert (a.address, b.address, c.address) == ("10.88.0.2", "10.88.0.3", "10.88.0.4")
    assert ask(a, "b") == "b" and ask(b, "c") == "c" and ask(c, a.address) == "a"
    net.partition(a, [b, c])
    assert ask(a, "b") == "TimeoutError" and ask(b, "a") == "TimeoutError" and ask(c, "a") == "TimeoutError"
    assert ask(b, "c") == "c"  # the majority still talks
    net.heal()
    assert ask(a, "b") == "b" and ask(c, "a") == "a"

def test_a_network_reaches_nothing_else(sandbox):
    net = sandbox.network(subnet="10.77.0.0/24")
    r = sandbox.run([PY, "-c", "import socket\\ntry:\\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\\nexcept OSError as e:\\n    print(type(e).__name__, e.errno)"],
                    network=net, text=True)
    assert r.stdout.split()[0] in ("OSError", "TimeoutError", "timeout") and r.stdout.split()[1] in ("101", "None"), r.stdout
    r = sandbox.run(["cat", "/etc/hosts"], network=net, hostname="solo", text=True)
    assert "10.77.0.3\\tsolo" in r.stdout
"""


def test_networks(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(NETWORK)
    run("-v", timeout=180).assert_outcomes(passed=2)


def test_library_without_pytest(pytester: pytest.Pytester, isolation_works: None) -> None:
    """``pytest_isolate.Sandbox`` in a plain script: no pytest import, context manager cleanup."""
    script = pytester.path / "script.py"
    script.write_text(textwrap.dedent("""
        import sys
        from pytest_isolate import Sandbox
        with Sandbox() as box:
            r = box.run(["hostname"], hostname="plain", check=True)
            print(r.stdout.decode().strip(), "pytest" in sys.modules)
        """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.split() == ["plain", "False"], out.stderr


def test_runs_back_to_back_with_builds_side_by_side(pytester: pytest.Pytester, isolation_works: None) -> None:
    """The factory builds sandboxes ahead, several at once: a loop of runs gets each program its
    own sandbox, a changed hostname discards what was being built for the old one, and after the
    Sandbox closes no process of it is left."""
    script = pytester.path / "loop.py"
    script.write_text(textwrap.dedent("""
        import psutil
        from pytest_isolate import Sandbox
        me = psutil.Process()
        with Sandbox() as box:
            names = [box.run(["hostname"], hostname=f"h{i % 3}", check=True).stdout.decode().strip() for i in range(12)]
            codes = [box.run(["true"]).returncode for _ in range(10)]
            pids = {box.run(["sh", "-c", "echo $$"], check=True).stdout.strip() for _ in range(4)}
        print(names == [f"h{i % 3}" for i in range(12)], codes == [0] * 10, pids == {b"2"}, me.children(recursive=True))
        """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.split() == ["True", "True", "True", "[]"], out.stdout + out.stderr


IMAGEKIT = '''
"""Small images made from this host's own programs and their libraries (no registry, no docker)."""
import gzip, hashlib, io, json, os, re, shutil, subprocess, tarfile

PROGRAMS = ("sh", "cat", "ls")


def mini_rootfs(dest):
    """A root filesystem with sh, cat and ls (and the libraries ldd names) and /etc/motd."""
    for name in PROGRAMS:
        path = os.path.realpath(shutil.which(name))
        target = os.path.join(dest, "bin", name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(path, target)
        for lib in re.findall(r"(/\\S+) \\(0x", subprocess.run(["ldd", path], capture_output=True, text=True).stdout):
            copy = dest + lib
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            shutil.copy2(os.path.realpath(lib), copy)
    os.makedirs(os.path.join(dest, "etc"), exist_ok=True)
    with open(os.path.join(dest, "etc", "motd"), "w") as f:
        f.write("hello from the image\\n")
    return dest


def tar_of(tree, gz=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(tree, arcname=".")
    return gzip.compress(buf.getvalue()) if gz else buf.getvalue()


def tar_entries(*names):
    """A layer of empty files (whiteouts are empty files named .wh.<name>) and the dirs they need."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


def oci_layout(dest, layers):
    blobs = os.path.join(dest, "blobs", "sha256")
    os.makedirs(blobs)
    def put(data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(data)
        return {"digest": "sha256:" + digest, "size": len(data)}
    config = put(json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": [dict(put(data), mediaType="application/vnd.oci.image.layer.v1.tar") for data in layers]}
    top = dict(put(json.dumps(manifest).encode()), mediaType=manifest["mediaType"])
    with open(os.path.join(dest, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [top]}, f)
    return dest


def docker_save(dest, layers):
    with tarfile.open(dest, "w") as tar:
        names = []
        for i, data in enumerate(layers):
            info = tarfile.TarInfo(f"l{i}/layer.tar"); info.size = len(data)
            tar.addfile(info, io.BytesIO(data)); names.append(info.name)
        manifest = json.dumps([{"Config": "c.json", "RepoTags": ["mini:latest"], "Layers": names}]).encode()
        for name, data in (("c.json", b"{}"), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest
'''

IMAGES = """
import os
import pytest
from imagekit import docker_save, mini_rootfs, oci_layout, tar_entries, tar_of
from pytest_isolate import ExecFailed, SpecError

SCRIPT = "ls /; cat /etc/motd; echo changed > /etc/motd; cat /etc/motd"

def check(sandbox, rootfs):
    r = sandbox.run(["sh", "-c", SCRIPT], rootfs=rootfs, text=True, check=True)
    top = r.stdout.split()
    assert {"bin", "etc", "proc", "dev", "sys"} <= set(top) and "usr" not in top, r.stdout  # not the host's tree
    assert r.stdout.endswith("hello from the image\\nchanged\\n")
    again = sandbox.run(["cat", "/etc/motd"], rootfs=rootfs, text=True)
    assert again.stdout == "hello from the image\\n"  # each sandbox has its own upper layer

def test_directory(sandbox, tmp_path):
    root = mini_rootfs(str(tmp_path / "root"))
    check(sandbox, root)
    with open(os.path.join(root, "etc", "motd")) as f:
        assert f.read() == "hello from the image\\n"  # the image itself is never written

def test_tarballs(sandbox, tmp_path):
    root = mini_rootfs(str(tmp_path / "root"))
    for name, gz in (("root.tar", False), ("root.tar.gz", True)):
        (tmp_path / name).write_bytes(tar_of(root, gz))
        check(sandbox, str(tmp_path / name))

def test_oci_layers_whiteouts_and_missing_program(sandbox, tmp_path):
    root = mini_rootfs(str(tmp_path / "root"))
    base = tar_of(root)
    top = tar_entries("etc/.wh.motd", "bin/.wh.ls", "etc/added")
    layout = oci_layout(str(tmp_path / "oci"), [base, top])
    r = sandbox.run(["sh", "-c", "cd /etc && echo *; test -e /bin/ls || echo no-ls"], rootfs=layout, text=True)
    assert r.stdout.split() == ["added", "no-ls"]
    with pytest.raises(ExecFailed, match="executable 'ls' not found in the rootfs image"):
        sandbox.run(["ls"], rootfs=layout)

def test_docker_save_archive(sandbox, tmp_path):
    root = mini_rootfs(str(tmp_path / "root"))
    archive = docker_save(str(tmp_path / "mini.tar"), [tar_of(root), tar_entries("etc/.wh.motd")])
    r = sandbox.run(["sh", "-c", "test -e /etc/motd || echo motd-deleted"], rootfs=archive, text=True)
    assert r.stdout == "motd-deleted\\n"

def test_bad_rootfs_is_named_before_anything_starts(sandbox, tmp_path):
    with pytest.raises(SpecError, match="rootfs=.*no-such-dir.*no such file or directory"):
        sandbox.run(["sh"], rootfs=str(tmp_path / "no-such-dir"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SpecError, match="not a directory, tar archive, OCI layout or docker-save archive"):
        sandbox.run(["sh"], rootfs=str(tmp_path / "notes.txt"))
"""


def test_rootfs_images(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(imagekit=IMAGEKIT, test_images=IMAGES)
    run("-v", "-p", "no:randomly").assert_outcomes(passed=5)


def test_sandbox_inside_an_isolated_test(pytester: pytest.Pytester, run: Runner) -> None:
    """Nested: as root it works without a cgroup of its own; rootless it is refused, saying why."""
    pytester.makepyfile("""
        import pytest

        @pytest.mark.isolated
        def test_nested(sandbox):
            r = sandbox.run(["sh", "-c", "echo $$ $PYTEST_ISOLATE_SANDBOX; hostname"], hostname="inner", text=True, check=True)
            assert r.stdout.split() == ["2", "1", "inner"]
            assert "cgroup" not in r.usage.sources.values()
        """)
    result = run("-v")
    if os.getuid() == 0:
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*this sandbox is nested in another one*refuses an overlay over the outer*"])
