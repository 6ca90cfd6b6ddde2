"""Accounting is right and reaches every channel: JUnit properties, --isolate-json, --isolate-top, the fixture."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from conftest import Runner, read_json

SUITE = """
import time, pytest

@pytest.mark.isolated
def test_hundred_mib(isolation):
    block = bytearray(100 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert isolation.usage().memory_peak >= 100 * 2**20

@pytest.mark.isolated
def test_one_cpu_second():
    # Spin until this process has had 1 s of CPU (a busy machine stretches the wall time), looking
    # at the clock rarely so that nearly all of it is user time.
    end = time.process_time() + 1.0
    while time.process_time() < end:
        for _ in range(100_000):
            pass

def test_plain():
    pass
"""


def test_figures_and_channels(pytester: pytest.Pytester, run: Runner, cgroups_ok: bool) -> None:
    pytester.makepyfile(SUITE)
    result = run("--isolate-json=out/usage.json", "--junitxml=junit.xml", "-o", "junit_family=xunit1", "--isolate-top=1")
    result.assert_outcomes(passed=3)
    data = read_json(pytester.path / "out" / "usage.json")
    header = data["header"]
    assert {"kernel", "root", "namespaces", "cgroup", "defaults", "unavailable_policy"} <= set(header)
    tests = {t["nodeid"].split("::")[1]: t for t in data["tests"]}
    assert set(tests) == {"test_hundred_mib", "test_one_cpu_second"}
    mem = tests["test_hundred_mib"]["usage"]
    cpu = tests["test_one_cpu_second"]["usage"]
    source = "cgroup" if cgroups_ok else "estimate"
    assert f"memory_peak={source}" in mem["sources"] and "wall=wall clock" in mem["sources"]
    assert 100 * 2**20 <= mem["memory_peak_bytes"] <= 130 * 2**20
    assert 0.9 <= cpu["cpu_user_s"] <= 1.5
    # the test body spins >= 1.0 s of CPU; the kernel's user/system split is sampled in ticks
    # (cgroup v1 cpuacct: USER_HZ, 10 ms), so allow two ticks below
    assert 0.98 <= cpu["cpu_user_s"] + cpu["cpu_system_s"] <= 1.6
    assert cpu["wall_s"] >= 1.0
    props = {}
    for case in ET.parse(str(pytester.path / "junit.xml")).getroot().iter("testcase"):
        props[case.get("name")] = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert float(props["test_hundred_mib"]["isolate.memory_peak_bytes"]) >= 100 * 2**20
    assert "isolate.cpu_user_s" in props["test_one_cpu_second"]
    assert props["test_plain"] == {}
    # the CPU ranking follows the measured figures: on a slow VM touching 100 MiB can cost more CPU
    # time than the 1 s spin
    busiest = max(tests, key=lambda name: tests[name]["usage"]["cpu_user_s"] + tests[name]["usage"]["cpu_system_s"])
    result.stdout.fnmatch_lines(
        ["*isolate: top 1 by peak memory*", "*MiB*test_hundred_mib*", "(1 more isolated tests; use --isolate-top=0 to show all)",
         "*isolate: top 1 by CPU time*", f"*{busiest}*"]
    )


def test_isolation_fixture_outside_a_sandbox_is_an_error(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile("def test_x(isolation):\n    pass\n")
    result = run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the isolation fixture exists only in isolated tests*@pytest.mark.isolated*"])


def test_xdist_carries_usage(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(SUITE)
    result = run("-n", "2", "--isolate-json=usage.json")
    result.assert_outcomes(passed=3)
    assert len(read_json(pytester.path / "usage.json")["tests"]) == 2
