"""What a stored task costs: bytes a task in Redis (memory and append-only file) and in SQLite (file).

    python bench/store_size.py                               # 500 tasks each of 5x1, 20x1 and 20x5
    python bench/store_size.py --tasks 20 --sizes 5x1 --out /tmp/s.json
    python bench/store_size.py --redis-url redis://host:6379/0   # a Redis of yours instead

Writes `--tasks` synthetic tasks of each size (`WAYxSHOT`: the support set as the service stores it,
28x28 float32 an example, with labels, a name, a model version and no warnings) through the
service's own stores, `RedisTaskStore` and `SqliteTaskStore`, one `add` a task as a registration
does. Redis: the growth of `used_memory` (INFO memory) and, when the append-only file is on, of
`aof_current_size` (INFO persistence), divided by the tasks; by default on a redis-server of its own
with compose's command line (`--appendonly yes --appendfsync always`) and no automatic rewrite of
the file, on a free port, in a temporary directory. The tasks of one size are deleted before the
next size is written; in a Redis given with `--redis-url` they have an owner of their own, and
anything else written there meanwhile is counted too. SQLite: the growth of a new database file
(after its close folds the write-ahead log in), divided by the tasks.
Writes bench/results/store-size-<date>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from api_tests.cluster import RedisServer  # noqa: E402  (run as a script: the repository first)
from bench.harness import git_commit, write_result  # noqa: E402
from service.storage.records import TaskInfo  # noqa: E402
from service.storage.redis_store import RedisTaskStore  # noqa: E402
from service.storage.sqlite import SqliteTaskStore  # noqa: E402

IMAGE_SIZE = 28  # the model's input: what intake stores for every support example
MODEL_VERSION = "metanet-0123456789ab"  # the form `model.checkpoint.weights_version` gives


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for word in text.split(","):
        way, _, shot = word.partition("x")
        if not (way.isdigit() and shot.isdigit()) or int(way) < 1 or int(shot) < 1:
            raise ValueError(word)
        sizes.append((int(way), int(shot)))
    return sizes


def synthetic_task(
    owner: str, n_way: int, n_shot: int, rng: np.random.Generator
) -> tuple[TaskInfo, np.ndarray]:
    """A task as a registration stores it; the pixel values do not matter (neither store compresses)."""
    labels = tuple(f"class-{k:02d}" for k in range(n_way) for _ in range(n_shot))
    support = rng.random((len(labels), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)  # (n, 28, 28)
    now = dt.datetime.now(dt.UTC)
    # memory_bytes as the service computes it for the default model (docs/deployment.md): its digits
    # are all that reach the store.
    info = TaskInfo(secrets.token_hex(16), owner, f"{n_way}-way {n_shot}-shot", labels, MODEL_VERSION,
                    608_512 + len(labels) * 621_576, now, now, ())
    return info, support


async def measure_redis(
    url: str, sizes: list[tuple[int, int]], n_tasks: int, seed: int, own: bool
) -> dict[str, Any]:
    store, client = RedisTaskStore(url), redis.Redis.from_url(url)  # the client reads INFO
    await store.open()
    if own:
        # Redis rewrites the append-only file once it has doubled (past 64 MB), which would shrink
        # it mid-count: what is measured is what a task adds to the file between rewrites.
        await client.config_set("auto-aof-rewrite-percentage", 0)
    owner = "store-size-" + secrets.token_hex(8)  # apart from any other task in a Redis of yours
    rng = np.random.default_rng(seed)

    async def readings() -> tuple[int, int | None, int]:
        memory, persistence = await client.info("memory"), await client.info("persistence")
        aof = persistence.get("aof_current_size") if persistence.get("aof_enabled") else None
        rewrites = int(persistence["aof_rewrites"]) + int(persistence["aof_rewrite_in_progress"])
        return int(memory["used_memory"]), None if aof is None else int(aof), rewrites

    rows, written = {}, []
    try:
        for n_way, n_shot in sizes:
            # One task of the size written and deleted first: the store's scripts are loaded and the
            # connection's buffers have grown to the size before the first reading.
            info, support = synthetic_task(owner, n_way, n_shot, rng)
            await store.add(info, support)
            await store.delete(owner, info.task_id)
            memory_before, aof_before, rewrites_before = await readings()
            for _ in range(n_tasks):
                info, support = synthetic_task(owner, n_way, n_shot, rng)
                await store.add(info, support)
                written.append(info.task_id)
            memory_after, aof_after, rewrites_after = await readings()
            counted = None not in (aof_before, aof_after) and rewrites_before == rewrites_after
            rows[f"{n_way}x{n_shot}"] = {
                "used_memory_bytes_per_task": round((memory_after - memory_before) / n_tasks, 1),
                # None: no append-only file, or Redis rewrote it meanwhile
                "aof_bytes_per_task": round((aof_after - aof_before) / n_tasks, 1) if counted else None,
            }
            while written:
                await store.delete(owner, written.pop())
        server = await client.info("server")
        return {"redis_version": server["redis_version"], "rows": rows}
    finally:
        while written:
            await store.delete(owner, written.pop())
        await store.close()
        await client.aclose()


async def measure_sqlite(
    work_dir: Path, sizes: list[tuple[int, int]], n_tasks: int, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows = {}
    for n_way, n_shot in sizes:
        path = work_dir / f"tasks-{n_way}x{n_shot}.sqlite3"
        store = SqliteTaskStore(path)
        await store.open()
        await store.close()  # the empty database: schema and cursor key
        empty = path.stat().st_size
        await store.open()
        for _ in range(n_tasks):
            await store.add(*synthetic_task("", n_way, n_shot, rng))
        await store.close()  # the last connection's close checkpoints the log into the file
        rows[f"{n_way}x{n_shot}"] = {"file_bytes_per_task": round((path.stat().st_size - empty) / n_tasks, 1)}
    return {"sqlite_version": sqlite3.sqlite_version, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=500, help="tasks written of each size")
    parser.add_argument("--sizes", default="5x1,20x1,20x5", help="WAYxSHOT, comma-separated")
    parser.add_argument("--redis-url", help="a running Redis to measure instead of one started here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"store-size-{dt.date.today()}.json")
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(f"--sizes takes WAYxSHOT pairs of whole numbers from 1, like 5x1,20x5, not {exc}")
    if args.tasks < 1:
        parser.error(f"--tasks must be at least 1, got {args.tasks}")

    with tempfile.TemporaryDirectory(prefix="store-size-") as tmp:
        work_dir = Path(tmp)
        redis_server = None
        url = args.redis_url
        if url is None:
            try:
                redis_server = RedisServer(work_dir / "redis")
            except pytest.skip.Exception as exc:
                parser.error(f"{exc.msg}; or give --redis-url")
            url = redis_server.start().url
        try:
            own = redis_server is not None
            redis_part = asyncio.run(measure_redis(url, sizes, args.tasks, args.seed, own))
        finally:
            if redis_server is not None:
                redis_server.stop()
        sqlite_part = asyncio.run(measure_sqlite(work_dir, sizes, args.tasks, args.seed))

    rows = []
    for n_way, n_shot in sizes:
        key = f"{n_way}x{n_shot}"
        examples = n_way * n_shot
        rows.append({"size": key, "n_way": n_way, "n_shot": n_shot, "examples": examples,
                     "support_bytes": examples * IMAGE_SIZE * IMAGE_SIZE * 4,
                     **redis_part["rows"][key], **sqlite_part["rows"][key]})
    words = argv if argv is not None else sys.argv[1:]
    result = {"command": " ".join(["python", "bench/store_size.py", *words]),
              "date": str(dt.date.today()), "git_commit": git_commit(),
              "redis": "given by --redis-url" if args.redis_url else
                       "started here with compose's command line (appendonly yes, appendfsync always),"
                       " no automatic rewrite of the append-only file",
              "redis_version": redis_part["redis_version"], "sqlite_version": sqlite_part["sqlite_version"],
              "tasks_per_size": args.tasks, "rows": rows}

    def kb(value: float | None) -> str:
        return "-" if value is None else f"{value / 1e3:,.1f} kB"

    lines = ["| task | examples | support set | Redis memory | Redis AOF | SQLite file |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['n_way']}-way {r['n_shot']}-shot | {r['examples']} | {kb(r['support_bytes'])} | "
              f"{kb(r['used_memory_bytes_per_task'])} | {kb(r['aof_bytes_per_task'])} | "
              f"{kb(r['file_bytes_per_task'])} |" for r in rows]
    write_result(result, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
