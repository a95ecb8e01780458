"""bench/store_size.py at a toy size: bytes a task in Redis and SQLite recorded for each size, a
given Redis left without the tasks it wrote, nonsense arguments refused with the reason. Needs
redis-server (skips without it, as test_scaleout.py does)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from api_tests.cluster import RedisServer, require
from api_tests.helpers import REPO


def store_size_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/store_size.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_a_small_run_records_bytes_a_task_in_redis_and_sqlite(tmp_path: Path) -> None:
    require("redis-server")
    out = tmp_path / "store-size.json"
    run = store_size_bench("--tasks", "4", "--sizes", "5x1,20x5", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["tasks_per_size"] == 4 and record["redis_version"] and record["sqlite_version"]
    assert [(r["size"], r["examples"], r["support_bytes"]) for r in record["rows"]] == [
        ("5x1", 5, 5 * 28 * 28 * 4), ("20x5", 100, 100 * 28 * 28 * 4)]
    for row in record["rows"]:
        # Every store keeps the float32 support set whole, and little else beside it.
        for field in ("used_memory_bytes_per_task", "aof_bytes_per_task", "file_bytes_per_task"):
            assert row["support_bytes"] <= row[field] <= 1.2 * row["support_bytes"] + 8192, (field, row)
    assert "| 20-way 5-shot | 100 |" in run.stdout and f"wrote {out}" in run.stdout


def test_a_given_redis_is_left_without_the_tasks_it_wrote(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        run = store_size_bench("--tasks", "3", "--sizes", "5x1", "--redis-url", server.url,
                               "--out", str(tmp_path / "s.json"))
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads((tmp_path / "s.json").read_text())["redis"] == "given by --redis-url"
        with redis.Redis.from_url(server.url) as client:
            left = {key.decode() for key in client.keys("*")}
        assert left <= {"metanet:seq", "metanet:cursor_key"}, left  # no task, list or owner
    finally:
        server.stop()


@pytest.mark.parametrize(("args", "named"), [
    (["--sizes", "5x0"], "--sizes takes WAYxSHOT pairs"),
    (["--sizes", "five"], "--sizes takes WAYxSHOT pairs"),
    (["--tasks", "0"], "--tasks must be at least 1"),
])
def test_nonsense_arguments_are_refused_with_the_reason(args: list[str], named: str, tmp_path: Path) -> None:
    run = store_size_bench(*args, "--out", str(tmp_path / "never.json"))
    assert run.returncode == 2 and named in run.stderr
    assert not (tmp_path / "never.json").exists()
