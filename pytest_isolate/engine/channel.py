"""A one-way record channel from the sandbox to the supervisor, kept in a memfd.

A memfd (not a pipe) so a sandbox can write any amount without the supervisor reading concurrently,
and so every record written before a crash survives it. Records are JSON lines; a line cut short by a
crash is ignored. Beside it a pipe says "done": the payload has written its last record, so the
supervisor can go on while the payload's process is still being torn down by the kernel; its one
byte says whether any report sent was a failure (``failed``), which the supervisor may need to know
before it reads the records (see Launcher.finish).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


class Channel:
    """Append-only JSON-lines records shared across fork (same open file, same offset)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("pytest-isolate", os.MFD_CLOEXEC)
        self.done_fd, self._done_writer = os.pipe()  # readable once the payload called finished()
        self.failed = False  # in the payload: a failed report was sent

    def send(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, **fields}, default=str).encode() + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view) :]

    def finished(self, **fields: Any) -> None:
        """In the sandbox: the last record; nothing is sent after it."""
        self.send("done", **fields)
        os.write(self._done_writer, b"f" if self.failed else b"d")

    def failed_before_done(self) -> bool:
        """In the supervisor, once the payload is done: whether it sent a failed report."""
        return os.read(self.done_fd, 1) != b"d"

    def records(self) -> Iterator[dict[str, Any]]:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        data = os.pread(self.fd, size, 0) if size else b""
        for line in data.split(b"\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record

    def close(self) -> None:
        if self.fd >= 0:
            for fd in (self.fd, self.done_fd, self._done_writer):
                os.close(fd)
            self.fd = -1
