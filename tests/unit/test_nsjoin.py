"""The kernel-version gate for joining namespaces through a pidfd."""

from __future__ import annotations

from pytest_isolate.linux.nsjoin import _kernel_at_least


def test_pidfd_setns_needs_linux_5_8() -> None:
    assert _kernel_at_least(5, 8, "5.8.0-1-amd64")
    assert _kernel_at_least(5, 8, "6.1.0")
    assert not _kernel_at_least(5, 8, "5.4.0-150-generic")
    assert not _kernel_at_least(5, 8, "weird")
