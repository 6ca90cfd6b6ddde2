"""cgroup limits, enforced by the kernel before damage; and their refusal where there are no cgroups."""

from __future__ import annotations

import pytest

from conftest import Runner, read_json

OOM = """
import pytest

@pytest.mark.isolated(memory="64M")
def test_hog():
    blocks = []
    while True:
        block = bytearray(8 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1          # touched: really resident, counted by the memory cgroup
        blocks.append(block)
"""


def test_memory_limit_oom_kills_and_says_so(pytester: pytest.Pytester, run: Runner, cgroups_ok: bool) -> None:
    pytester.makepyfile(OOM)
    result = run("--isolate-json=usage.json")
    result.assert_outcomes(failed=1) if cgroups_ok else result.assert_outcomes(errors=1)
    if not cgroups_ok:
        result.stdout.fnmatch_lines(["*limits memory=67108864 cannot be enforced*Fix:*", "*--isolate-unavailable=skip*"])
        return
    result.stdout.fnmatch_lines(["*OOM-killed: memory limit 64.0 MiB reached (peak *MiB); killed pid 2 (*), the test process*"])
    usage = read_json(pytester.path / "usage.json")["tests"][0]["usage"]
    assert usage["oom_kills"] >= 1
    assert 56 * 2**20 <= usage["memory_peak_bytes"] <= 64 * 2**20


def test_pids_limit_stops_a_fork_bomb(pytester: pytest.Pytester, run: Runner, cgroups_ok: bool) -> None:
    pytester.makepyfile(
        """
        import os, time, pytest

        @pytest.mark.isolated(pids=16)
        def test_bomb():
            children = []
            for _ in range(64):
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                children.append(pid)
        """
    )
    result = run()
    if not cgroups_ok:
        result.assert_outcomes(errors=1)
        return
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*BlockingIOError*", "*the sandbox's process limit pids=16 is reached*"])


def test_timeout_kills_the_whole_sandbox(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        """
        import subprocess, sys, time, pytest

        @pytest.mark.isolated(timeout=1.5)
        def test_hangs():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            time.sleep(60)

        def test_next_one_runs():
            pass
        """
    )
    result = run("-p", "no:timeout")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Timeout: the isolated test ran for 1.* s, over its limit of timeout=1.5 s; the whole sandbox*"])
    assert result.duration < 30


def test_cpu_quota_throttles(pytester: pytest.Pytester, run: Runner, cgroups_ok: bool) -> None:
    pytester.makepyfile(
        """
        import time, pytest

        @pytest.mark.isolated(cpus=0.25)
        def test_spin():
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                pass
        """
    )
    result = run("--isolate-json=usage.json")
    if not cgroups_ok:
        result.assert_outcomes(errors=1)
        return
    result.assert_outcomes(passed=1)
    usage = read_json(pytester.path / "usage.json")["tests"][0]["usage"]
    assert usage["cpu_user_s"] + usage["cpu_system_s"] < 0.6  # a quarter CPU for one second, plus slack
    assert usage["cpu_throttled_s"] > 0


def test_pytest_timeout_marker_is_enforced_by_the_supervisor(pytester: pytest.Pytester, run: Runner) -> None:
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(
        """
        import time, pytest

        @pytest.mark.timeout(1)
        @pytest.mark.isolated
        def test_slow():
            time.sleep(30)
        """
    )
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout: the isolated test ran for 1.* s, over its limit of timeout=1 s*"])
    result.stdout.no_fnmatch_line("*Timeout (0:00:01)!*")  # pytest-timeout's own signal never fired


@pytest.mark.parametrize(
    ("args", "env", "ini", "message"),
    [
        (["--isolate-memory=256Q"], {}, "", "*memory='256Q' from command line (--isolate-memory): unknown unit Q*"),
        ([], {"PYTEST_ISOLATE_CPUS": "lots"}, "", "*cpus='lots' from environment (PYTEST_ISOLATE_CPUS): expected a positive number*"),
        ([], {}, "isolate_pids = -3", "*pids=-3 from ini (isolate_pids): expected a positive integer*"),
        ([], {}, "isolate_unavailable = maybe", "*unavailable='maybe' from ini (isolate_unavailable): expected one of fail, skip, degrade*"),
    ],
)
def test_bad_settings_name_their_source(pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch,
                                         args: list[str], env: dict[str, str], ini: str, message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(): pass")
    result = run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_precedence_marker_over_cli_over_env_over_ini(pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nisolate_timeout = 11\nisolate_pids = 101\nisolate_cpus = 3\n")
    monkeypatch.setenv("PYTEST_ISOLATE_PIDS", "202")
    monkeypatch.setenv("PYTEST_ISOLATE_CPUS", "2")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated(timeout=33)
        def test_limits(isolation):
            assert isolation.limits.timeout == 33      # marker beats everything
            assert isolation.limits.cpus == 1.0        # command line beats env and ini
            assert isolation.limits.pids == 202        # env beats ini
            assert isolation.limits.memory is None
        """
    )
    run("--isolate-cpus=1", "--isolate-unavailable=degrade", "-W", "ignore::pytest.PytestWarning").assert_outcomes(passed=1)


def test_unavailable_policy_skip_and_degrade(pytester: pytest.Pytester, run: Runner, cgroups_ok: bool) -> None:
    if cgroups_ok:
        pytest.skip("limits are enforceable here; the refusal cell is rootless cgroup v1 (CI's rootless run)")
    pytester.makepyfile(OOM.replace("while True", "for _ in range(2)"))
    skipped = run("--isolate-unavailable=skip", "-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*pytest-isolate: the limits memory=67108864 cannot be enforced*"])
    degraded = run("--isolate-unavailable=degrade", "-W", "default::pytest.PytestWarning")
    degraded.assert_outcomes(passed=1, warnings=1)
    degraded.stdout.fnmatch_lines(["*IsolationDegradedWarning*cannot be enforced*running with less isolation*"])


def test_pytest_timeout_applies_to_every_isolated_test_and_func_only(pytester: pytest.Pytester, run: Runner) -> None:
    """The plan of the next test is made early (to build its sandbox ahead): its timeout must still count."""
    pytest.importorskip("pytest_timeout")
    pytester.makeini("[pytest]\ntimeout_func_only = true\n")
    pytester.makepyfile(
        """
        import time, pytest
        pytestmark = [pytest.mark.isolated, pytest.mark.timeout(1)]

        def test_first():
            time.sleep(30)

        def test_second():
            time.sleep(30)
        """
    )
    result = run()
    result.assert_outcomes(failed=2)
    assert result.duration < 25


def test_degrade_under_warnings_as_errors_fails_the_test_not_the_run(pytester: pytest.Pytester, run: Runner, cgroups_ok: bool) -> None:
    if cgroups_ok:
        pytest.skip("limits are enforceable here; the refusal cell is rootless cgroup v1 (CI's rootless run)")
    pytester.makepyfile(OOM.replace("while True", "for _ in range(2)") + "\ndef test_other():\n    pass\n")
    result = run("--isolate-unavailable=degrade")  # run() passes -W error
    result.assert_outcomes(errors=1, passed=1)
    result.stdout.fnmatch_lines(["*IsolationDegradedWarning*cannot be enforced*"])


def test_cgroups_off(pytester: pytest.Pytester, run: Runner) -> None:
    """--isolate-cgroups=off: isolation and timeouts without any cgroup; limits meet the policy."""
    pytester.makepyfile("""
        import time
        import pytest

        @pytest.mark.isolated
        def test_plain():
            pass

        @pytest.mark.isolated(memory="64M")
        def test_limited():
            pass

        @pytest.mark.isolated(timeout=0.5)
        def test_slow():
            time.sleep(30)
        """)
    result = run("--isolate-cgroups=off", "--isolate-json=usage.json", "-rfE")
    result.assert_outcomes(passed=1, failed=1, errors=1)  # the refusal is a setup error, as everywhere
    result.stdout.fnmatch_lines(["isolate: *limits: unavailable (cgroups are turned off (--isolate-cgroups=off))*"])
    result.stdout.fnmatch_lines(["*memory=* cannot be enforced: cgroups are turned off (--isolate-cgroups=off). Fix: use --isolate-cgroups=auto*"])
    result.stdout.fnmatch_lines(["*test_slow*Timeout: the isolated test ran for*over its limit of timeout=0.5 s*"])
    tests = {t["nodeid"].split("::")[1]: t for t in read_json(pytester.path / "usage.json")["tests"]}
    assert "cgroup" not in tests["test_plain"]["usage"]["sources"]
    bad = run("-o", "isolate_cgroups=sometimes")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*cgroups='sometimes' from ini (isolate_cgroups): expected one of auto, off*"])
