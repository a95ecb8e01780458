"""The CI version of the soak (bench/soak.py): 30 seconds of mixed register / classify / delete at
concurrency 32 with zero errors, resident memory at most 10% above its warm-up level, and no more
open file descriptors at the end than after warm-up. The recorded 5-minute run is in bench/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api_tests.helpers import REPO


@pytest.mark.slow
def test_a_30_second_soak_has_no_errors_no_memory_growth_and_no_fd_growth(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "bench/soak.py", "--seconds", "30", "--concurrency", "32", "--json", str(out),
         "--server-log", str(tmp_path / "server.log")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.exists(), run.stdout[-5000:] + run.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == 0, result["error_samples"]
    assert result["requests_after_warmup"] > 0
    assert {"register", "classify", "delete"} <= set(result["latency_ms"])
    assert result["rss_growth"] <= 0.10, result["rss_mib"]
    assert result["open_fds"]["end"] <= result["open_fds"]["warmup"], result["open_fds"]
    assert result["passed"] and run.returncode == 0, result["failures"]
