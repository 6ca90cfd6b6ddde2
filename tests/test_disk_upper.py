"""Upper layers on disk: in a user namespace before Linux 6.6, tmpfs cannot hold overlayfs's
``user.overlay.*`` xattrs, so each sandbox's upper layers go to directories under
``/var/tmp/pytest-isolate-<uid>`` and ``$TMPDIR/pytest-isolate-<uid>`` (host.disk_upper_dirs).

This host's kernel may be newer: the suites below plan as on an older one (a conftest raises the
kernel the plugin requires for upper layers in tmpfs), with ``user_namespace=True`` so that root
takes that path too. The kernel work is real: overlays with upper layers on disk.
"""

from __future__ import annotations

import os

import pytest

from conftest import Runner

OLD_KERNEL = """
import pytest_isolate.engine.host as host
import pytest_isolate.engine.sandbox as sandbox
import pytest_isolate.plugin.hooks as hooks

host.TMPFS_USERXATTR_KERNEL = (999, 0)  # plan as a kernel without user xattrs on tmpfs would

def _recorded():  # the bases this run makes, for the check that they are gone afterwards
    made = host.disk_upper_dirs()
    with open("bases", "a") as f:
        f.write("".join(base + "\\n" for base in made))
    return made

hooks.disk_upper_dirs = sandbox.disk_upper_dirs = _recorded
"""


def _left_behind(pytester: pytest.Pytester) -> list[str]:
    """The run's upper layer bases still on disk (others' runs may be using theirs meanwhile)."""
    bases = (pytester.path / "bases").read_text().split()
    assert bases, "the run made no upper layer bases on disk"
    return [base for base in bases if os.path.exists(base)]


def test_overlapping_tests_keep_their_upper_layers(pytester: pytest.Pytester, run: Runner) -> None:
    """A sandbox built ahead as a guess for the next test shares the plan's bases with the running
    one; it used to be discarded and its removal took the running test's upper layers (a file
    created after that failed with ENOENT). Every test writes after a pause, sees no other's file,
    and nothing is left on disk afterwards."""
    pytester.makeconftest(OLD_KERNEL)
    pytester.makepyfile("""
        import os, time, pytest

        @pytest.mark.isolated(user_namespace=True)
        @pytest.mark.parametrize("i", range(10))
        def test_write(i):
            assert [n for n in os.listdir("/tmp") if n.startswith("isolate-disk-")] == []
            time.sleep(0.1)  # long enough for the factory to act on the next test's order
            with open(f"/tmp/isolate-disk-{i}", "w") as f:
                f.write("x" * 100000)
            os.mkdir(f"/var/tmp/isolate-disk-{i}")
    """)
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=10)
    assert not list(pytester.path.glob("isolate-disk-*"))
    assert not os.path.exists("/tmp/isolate-disk-0")
    assert _left_behind(pytester) == []


def test_sandbox_builds_ahead_with_upper_layers_on_disk(pytester: pytest.Pytester, run: Runner) -> None:
    """The Sandbox API builds two sandboxes ahead of a loop of runs; on disk too, each has upper
    layer directories of its own, removed when it ends."""
    pytester.makeconftest(OLD_KERNEL)
    pytester.makepyfile("""
        from pytest_isolate import Sandbox

        def test_loop(tmp_path):
            with Sandbox(user_namespace=True) as box:
                for i in range(6):
                    result = box.run(["sh", "-c", f"ls /tmp | grep -c '^isolate-box-'; sleep 0.05; "
                                                  f"echo {i} > /tmp/isolate-box-{i} && cat /tmp/isolate-box-{i}"],
                                     text=True, check=True)
                    assert result.stdout.split() == ["0", str(i)], result
    """)
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert _left_behind(pytester) == []
