"""tmp_path stays writable and persists: what a sandboxed test leaves there can be inspected."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Made once, in the pytest process, under pytest's base temporary directory - which the sandbox
    # bind-mounts read-write, exactly like each test's own tmp_path.
    return tmp_path_factory.mktemp("results")


@pytest.mark.isolated
def test_writes_its_results(tmp_path: Path, results_dir: Path) -> None:
    # Unlike the rest of the filesystem, tmp_path is the real directory on the host: as with plain
    # pytest, what a failing test left there is still there afterwards.
    (tmp_path / "log.txt").write_text("kept\n")
    (results_dir / "report.txt").write_text(f"see {tmp_path}\n")


def test_results_persist_outside_the_sandbox(results_dir: Path) -> None:
    # Not isolated: back on the host, the file the sandboxed test wrote is there.
    report = (results_dir / "report.txt").read_text()
    log = Path(report.split()[1]) / "log.txt"
    assert log.read_text() == "kept\n"
