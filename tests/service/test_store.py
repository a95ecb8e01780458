"""The SQLite task store: round trips, pagination, owners, and all-or-nothing writes."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from service.errors import InvalidInput, TaskNotFound
from service.store import SqliteTaskStore, TaskInfo


def info(task_id: str, owner: str = "", labels: tuple[str, ...] = ("a", "b", "a")) -> TaskInfo:
    now = datetime.now(UTC)
    return TaskInfo(task_id, owner, "name", labels, "metanet-test", 123, now, now)


def support(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28), dtype=np.float32)


def run(path: Path, scenario) -> None:
    async def main() -> None:
        store = SqliteTaskStore(path / "tasks.sqlite3")
        await store.open()
        try:
            await scenario(store)
        finally:
            await store.close()
    asyncio.run(main())


def test_a_task_round_trips_bit_for_bit(tmp_path: Path) -> None:
    async def scenario(store: SqliteTaskStore) -> None:
        x = support(3)
        await store.add(info("t1"), x)
        got = await store.get("", "t1")
        assert (got.name, got.example_labels, got.model_version, got.memory_bytes) == (
            "name", ("a", "b", "a"), "metanet-test", 123)
        assert got.labels == ["a", "b"] and got.shots == {"a": 2, "b": 1}
        np.testing.assert_array_equal(await store.support("", "t1"), x)
        assert await store.count() == 1
    run(tmp_path, scenario)


def test_pages_follow_creation_order_and_owners_are_kept_apart(tmp_path: Path) -> None:
    async def scenario(store: SqliteTaskStore) -> None:
        for i in range(5):
            await store.add(info(f"t{i}"), support(2, i))
        await store.add(info("other", owner="bob"), support(2))
        ids, cursor = [], None
        while True:
            page = await store.page("", 2, cursor)
            ids += [t.task_id for t in page.tasks]
            if (cursor := page.next_cursor) is None:
                break
        assert ids == [f"t{i}" for i in range(5)]
        assert [t.task_id for t in (await store.page("bob", 10, None)).tasks] == ["other"]
        with pytest.raises(TaskNotFound):
            await store.get("bob", "t0")
        with pytest.raises(InvalidInput):
            await store.page("", 2, "garbage")
    run(tmp_path, scenario)


def test_replace_and_delete_refuse_unknown_tasks_and_change_nothing(tmp_path: Path) -> None:
    async def scenario(store: SqliteTaskStore) -> None:
        await store.add(info("t1"), support(3))
        with pytest.raises(TaskNotFound):
            await store.replace_support(info("nope"), support(4))
        with pytest.raises(TaskNotFound):
            await store.delete("", "nope")
        grown = replace(info("t1"), example_labels=("a", "b", "a", "c"))
        await store.replace_support(grown, support(4))
        assert (await store.get("", "t1")).example_labels == ("a", "b", "a", "c")
        await store.delete("", "t1")
        assert await store.count() == 0
    run(tmp_path, scenario)


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    async def scenario(store: SqliteTaskStore) -> None:
        await store.add(info("t1"), support(2))
        with pytest.raises(Exception, match="UNIQUE"):
            await store.add(info("t1"), support(2))  # same id: the transaction rolls back
        assert await store.count() == 1
        await store.add(info("t2"), support(2))  # and the connection is usable afterwards
        assert await store.count() == 2
    run(tmp_path, scenario)
