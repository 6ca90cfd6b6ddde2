"""Test a command-line tool's memory budget with the Sandbox API.

`sort` stands in for your CLI. Each run gets its own sandbox with a hard memory limit enforced by the
kernel, and the result says what the run used, measured by its cgroup.
"""

from __future__ import annotations

import sys
from typing import Iterator

import pytest

from pytest_isolate import Sandbox

MiB = 2**20


@pytest.fixture
def box() -> Iterator[Sandbox]:
    # A fixture of your own on the library: where this host cannot enforce limits (rootless on
    # cgroup v1) the tests skip with the reason instead of failing.
    with Sandbox(unavailable="skip", skip=pytest.skip, memory="64M", timeout=60) as box:
        yield box


def test_sort_stays_within_its_budget(box: Sandbox, tmp_path) -> None:
    data = tmp_path / "numbers.txt"
    data.write_text("".join(f"{(i * 7919) % 100003}\n" for i in range(200_000)))
    result = box.run(["sort", "-n", "-S", "16M", str(data)], check=True)
    numbers = [int(n) for n in result.stdout.split()]
    assert numbers == sorted(numbers) and len(numbers) == 200_000
    assert result.usage.memory_peak < 64 * MiB
    print(f"sort used {result.usage.memory_peak / MiB:.1f} MiB at peak, "
          f"{result.usage.cpu_user + result.usage.cpu_system:.2f}s of CPU")


def test_a_runaway_is_stopped_by_the_kernel(box: Sandbox) -> None:
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(2**20))"
    result = box.run([sys.executable, "-c", hog])
    assert result.oom_killed  # killed at the limit, not after the damage
    assert result.usage.memory_peak <= 65 * MiB
