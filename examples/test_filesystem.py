"""The sandbox sees the whole host filesystem, copy-on-write: writes vanish afterwards.

Run with ``python -m pytest examples -v`` (or ``bash ci/quickstart.sh``). The tests in this file
run in order: the first writes into the sandbox, the second (not isolated) looks at the host.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# A new file directly inside /etc. Rootless, this works too: /etc is the root of its own overlay
# mount in the sandbox, and the root of an overlay needs no copy-up. What a rootless sandbox cannot
# do is modify an *existing* root-owned file (it would need a copy-up of a file owned by an unmapped
# uid; see the docs), so the example only creates files.
ETC_FILE = Path("/etc/pytest-isolate-example.conf")
# As root the sandbox may also write deep inside a root-owned tree.
USR_FILE = Path("/usr/local/lib/pytest-isolate-example/marker.txt")


@pytest.mark.isolated
def test_writes_into_etc_inside_the_sandbox() -> None:
    # Guard: only write to /etc if we really are in a sandbox (PID 2 under the sandbox's init).
    # Without the plugin this test fails here instead of touching the host.
    assert os.getpid() == 2 and socket.gethostname() == "isolated", "not running isolated!"

    ETC_FILE.write_text("written inside the sandbox\n")
    assert ETC_FILE.read_text() == "written inside the sandbox\n"

    if os.geteuid() == 0:
        USR_FILE.parent.mkdir(parents=True)
        USR_FILE.write_text("root may write anywhere - into its private copy\n")
        assert USR_FILE.exists()


def test_the_write_vanished() -> None:
    # Not isolated: this runs in the pytest process on the host, after the sandbox is gone.
    assert not ETC_FILE.exists(), f"{ETC_FILE} leaked onto the host"
    assert not USR_FILE.parent.exists(), f"{USR_FILE.parent} leaked onto the host"
