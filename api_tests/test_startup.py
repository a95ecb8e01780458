"""Startup: weights that cannot be loaded stop the server with a clear message and status 1."""

from __future__ import annotations

from pathlib import Path

from api_tests.helpers import Server


def test_server_with_a_missing_checkpoint_exits_1_naming_the_file(tmp_data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no-weights-here"
    empty.mkdir()
    server = Server(tmp_data, checkpoint=empty).start(wait=False)
    assert server.process is not None
    assert server.process.wait(timeout=180) == 1
    log = server.log_tail()
    assert "CheckpointError" in log and "no-weights-here" in log and "is missing" in log, log
