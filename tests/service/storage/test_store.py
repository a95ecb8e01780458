"""The task stores, SQLite and Redis alike: round trips, pagination, owners, all-or-nothing and
compare-and-set writes; then what only Redis has: retried writes, shared cursors, reachability."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis

from service.errors import InvalidInput, NotReady, TaskNotFound
from service.settings import Settings
from service.storage import SqliteTaskStore, TaskChanged, TaskInfo, TaskStore, TaskWarning, open_store
from service.storage.redis_store import NS, RedisTaskStore
from tests.service.conftest import free_port

Scenario = Callable[[TaskStore], Awaitable[None]]


def info(task_id: str, owner: str = "", labels: tuple[str, ...] = ("a", "b", "a")) -> TaskInfo:
    now = datetime.now(UTC)
    return TaskInfo(task_id, owner, "name", labels, "metanet-test", 123, now, now)


def grown(task: TaskInfo, *labels: str, days: int = 1) -> TaskInfo:
    """The task with examples added, as a later write records it."""
    return replace(task, example_labels=(*task.example_labels, *labels),
                   updated_at=task.updated_at + timedelta(days))


def support(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28), dtype=np.float32)


@pytest.fixture(params=["sqlite", "redis"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], TaskStore]:
    """Makes stores over one fresh, empty database (two of them stand for two replicas)."""
    if request.param == "sqlite":
        return lambda: SqliteTaskStore(tmp_path / "tasks.sqlite3")
    url = request.getfixturevalue("redis_server")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return lambda: RedisTaskStore(url)


def run(*stores: TaskStore, scenario: Callable[..., Awaitable[None]]) -> None:
    async def main() -> None:
        for store in stores:
            await store.open()
        try:
            await scenario(*stores)
        finally:
            for store in stores:
                await store.close()
    asyncio.run(main())


def test_a_task_round_trips_bit_for_bit(new_store) -> None:
    async def scenario(store: TaskStore) -> None:
        x = support(3)
        task = info("t1")
        await store.add(task, x)
        got = await store.get("", "t1")
        assert got == task
        assert got.labels == ["a", "b"] and got.shots == {"a": 2, "b": 1}
        loaded, y = await store.load("", "t1")
        assert loaded == task
        np.testing.assert_array_equal(y, x)
        assert y.dtype == np.float32 and y.flags.writeable
        assert await store.count() == 1
    run(new_store(), scenario=scenario)


def test_a_task_without_a_name_keeps_none(new_store) -> None:
    async def scenario(store: TaskStore) -> None:
        await store.add(replace(info("t1"), name=None), support(2))
        assert (await store.get("", "t1")).name is None
    run(new_store(), scenario=scenario)


def test_pages_follow_creation_order_and_owners_are_kept_apart(new_store) -> None:
    async def scenario(store: TaskStore) -> None:
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
        with pytest.raises(TaskNotFound):
            await store.load("bob", "t0")
        with pytest.raises(InvalidInput):
            await store.page("", 2, "garbage")
    run(new_store(), scenario=scenario)


def test_replace_and_delete_refuse_unknown_tasks_and_change_nothing(new_store) -> None:
    async def scenario(store: TaskStore) -> None:
        task = info("t1")
        await store.add(task, support(3))
        with pytest.raises(TaskNotFound):
            await store.replace_support(info("nope"), support(4), if_updated_at=task.updated_at)
        with pytest.raises(TaskNotFound):
            await store.replace_support(replace(task, owner="bob"), support(4), if_updated_at=task.updated_at)
        with pytest.raises(TaskNotFound):
            await store.delete("", "nope")
        with pytest.raises(TaskNotFound):
            await store.delete("bob", "t1")
        bigger = grown(task, "c")
        await store.replace_support(bigger, support(4), if_updated_at=task.updated_at)
        assert await store.get("", "t1") == bigger
        await store.delete("", "t1")
        assert await store.count() == 0
        assert (await store.page("", 10, None)).tasks == []
    run(new_store(), scenario=scenario)


def test_replace_support_writes_only_over_the_version_it_read(new_store) -> None:
    async def scenario(store: TaskStore) -> None:
        task = info("t1")
        await store.add(task, support(3))
        first = grown(task, "c")
        await store.replace_support(first, support(4, 1), if_updated_at=task.updated_at)
        second = grown(task, "d", days=2)
        with pytest.raises(TaskChanged):  # read before `first` was written: it would undo it
            await store.replace_support(second, support(4, 2), if_updated_at=task.updated_at)
        got, x = await store.load("", "t1")
        assert got == first
        np.testing.assert_array_equal(x, support(4, 1))
    run(new_store(), scenario=scenario)


def test_rebind_updates_the_version_and_never_brings_back_a_deleted_task(new_store) -> None:
    async def scenario(store: TaskStore) -> None:
        await store.add(info("t1"), support(2))
        await store.rebind("", "t1", "metanet-new", 456)
        got = await store.get("", "t1")
        assert (got.model_version, got.memory_bytes) == ("metanet-new", 456)
        await store.rebind("bob", "t1", "metanet-bob", 1)  # not bob's: nothing changes
        assert (await store.get("", "t1")).model_version == "metanet-new"
        await store.delete("", "t1")
        await store.rebind("", "t1", "metanet-late", 789)  # a rebuild that finished after the delete
        with pytest.raises(TaskNotFound):
            await store.get("", "t1")
        assert await store.count() == 0
    run(new_store(), scenario=scenario)


WARNINGS = (
    TaskWarning("misclassified_example", "example 2 ...",
                {"example_index": 2, "label": "a", "predicted_label": "b", "confidence": 0.75}),
    TaskWarning("indistinguishable_examples", "examples 0 and 1 ...",
                {"example_indices": [0, 1], "labels": ["a", "b"], "cosine": 0.995}),
)


def test_warnings_are_kept_with_the_task_through_every_write(new_store) -> None:
    async def scenario(store: TaskStore) -> None:
        task = replace(info("t1"), warnings=WARNINGS)
        await store.add(task, support(3))
        assert (await store.get("", "t1")).warnings == WARNINGS
        assert (await store.load("", "t1"))[0].warnings == WARNINGS
        assert (await store.page("", 10, None)).tasks[0].warnings == WARNINGS
        later = replace(grown(task, "b"), warnings=WARNINGS[1:])
        await store.replace_support(later, support(4), if_updated_at=task.updated_at)
        assert (await store.get("", "t1")).warnings == WARNINGS[1:]
        await store.rebind("", "t1", "metanet-new", 456)  # no warnings given: kept as they are
        assert (await store.get("", "t1")).warnings == WARNINGS[1:]
        await store.rebind("", "t1", "metanet-newer", 789, warnings=())  # new weights found none
        got = await store.get("", "t1")
        assert (got.model_version, got.warnings) == ("metanet-newer", ())
    run(new_store(), scenario=scenario)


def test_a_task_stored_before_there_were_warnings_reads_as_having_none(tmp_path: Path) -> None:
    # The database of the previous version of the service: no warnings column.
    path = tmp_path / "tasks.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA_BEFORE_WARNINGS)
        db.execute("INSERT INTO tasks (task_id, owner, name, example_labels, support, image_size,"
                   " model_version, memory_bytes, created_at, updated_at) VALUES"
                   " ('old', '', NULL, '[\"a\", \"b\"]', ?, 28, 'v0', 1, ?, ?)",
                   (support(2).tobytes(), "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"))

    async def scenario(store: TaskStore) -> None:
        old = await store.get("", "old")
        assert old.example_labels == ("a", "b") and old.warnings == ()
        await store.add(replace(info("new"), warnings=WARNINGS), support(2))
        assert (await store.get("", "new")).warnings == WARNINGS
    run(SqliteTaskStore(path), SqliteTaskStore(path), scenario=lambda a, b: scenario(a))
    with sqlite3.connect(path) as db:  # and the code before warnings still writes to it
        db.execute("INSERT INTO tasks (task_id, owner, name, example_labels, support, image_size,"
                   " model_version, memory_bytes, created_at, updated_at) VALUES"
                   " ('older', '', NULL, '[\"a\", \"b\"]', ?, 28, 'v0', 1, ?, ?)",
                   (support(2).tobytes(), "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"))

    async def again(store: TaskStore) -> None:
        assert (await store.get("", "older")).warnings == ()
    run(SqliteTaskStore(path), scenario=again)


def test_a_redis_task_stored_before_there_were_warnings_reads_as_having_none(redis_server: str) -> None:
    async def scenario(store: TaskStore) -> None:
        await store.add(replace(info("t1"), warnings=WARNINGS), support(2))
        with redis.Redis.from_url(redis_server) as client:
            client.hdel(f"{NS}task:t1", "warnings")  # as the code before warnings wrote it
        assert (await store.get("", "t1")).warnings == ()
        assert (await store.page("", 10, None)).tasks[0].warnings == ()
    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()
    run(RedisTaskStore(redis_server), scenario=scenario)


_SCHEMA_BEFORE_WARNINGS = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    name TEXT, example_labels TEXT NOT NULL, support BLOB NOT NULL, image_size INTEGER NOT NULL,
    model_version TEXT NOT NULL, memory_bytes INTEGER NOT NULL, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX tasks_by_owner ON tasks (owner, seq);
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
INSERT INTO meta VALUES ('cursor_key', randomblob(32));
"""


def test_a_failed_write_leaves_nothing_behind(new_store) -> None:
    async def scenario(store: TaskStore) -> None:
        await store.add(info("t1"), support(2))
        with pytest.raises(Exception, match="UNIQUE|already exists"):
            await store.add(info("t1"), support(2))  # same id: nothing is written
        assert await store.count() == 1
        await store.add(info("t2"), support(2))  # and the store is usable afterwards
        assert await store.count() == 2
    run(new_store(), scenario=scenario)


def test_two_stores_over_one_database_see_each_others_writes_and_cursors(new_store) -> None:
    async def scenario(a: TaskStore, b: TaskStore) -> None:
        for i in range(3):
            await a.add(info(f"t{i}"), support(2, i))
        page = await a.page("", 1, None)
        assert [t.task_id for t in (await b.page("", 5, page.next_cursor)).tasks] == ["t1", "t2"]
        await b.delete("", "t0")
        with pytest.raises(TaskNotFound):
            await a.get("", "t0")
        with pytest.raises(InvalidInput):  # a cursor is bound to its owner
            await b.page("bob", 5, page.next_cursor)
    run(new_store(), new_store(), scenario=scenario)


# ------------------------------------------------------------------------------ Redis only


def test_redis_writes_replayed_after_a_lost_reply_count_once(redis_server: str) -> None:
    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()

    async def scenario(store: RedisTaskStore) -> None:
        task = info("t1")
        await store.add(task, support(2))
        await store.add(task, support(2))  # the client retried a call that had landed: no error
        assert await store.count() == 1
        bigger = grown(task, "c")
        await store.replace_support(bigger, support(4), if_updated_at=task.updated_at)
        await store.replace_support(bigger, support(4), if_updated_at=task.updated_at)  # replayed
        assert await store.get("", "t1") == bigger
    run(RedisTaskStore(redis_server), scenario=scenario)


def test_redis_keeps_every_key_of_the_store_under_its_namespace(redis_server: str) -> None:
    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()

        async def scenario(store: RedisTaskStore) -> None:
            await store.add(info("t1", owner="alice"), support(2))
            await store.add(info("t2", owner="alice"), support(2))
            await store.delete("alice", "t1")

        run(RedisTaskStore(redis_server), scenario=scenario)
        keys = {key.decode() for key in client.keys("*")}
        assert keys == {f"{NS}task:t2", f"{NS}owner:alice", f"{NS}tasks", f"{NS}seq", f"{NS}cursor_key"}
        assert client.hget(f"{NS}task:t2", "support") == support(2).astype("<f4").tobytes()


def test_an_unreachable_redis_is_not_ready_rather_than_an_internal_error(redis_server: str) -> None:
    async def scenario() -> None:
        store = RedisTaskStore(redis_server)
        await store.open()
        await store.close()
        nobody = free_port()  # bound, then released: nothing listens there
        closed = RedisTaskStore(f"redis://127.0.0.1:{nobody}/0", timeout_s=1)
        with pytest.raises(NotReady, match="unreachable"):
            await closed.open()
        await closed.close()
    asyncio.run(scenario())


def test_the_store_is_chosen_by_store_url_and_its_password_is_never_shown(tmp_path: Path) -> None:
    assert isinstance(open_store(Settings(data_dir=tmp_path)), SqliteTaskStore)
    assert isinstance(open_store(Settings(data_dir=tmp_path, store_url="")), SqliteTaskStore)
    store = open_store(Settings(store_url="redis://:s3cret@redis.internal:6379/2"))
    assert isinstance(store, RedisTaskStore)
    assert str(store) == "Redis at redis://:***@redis.internal:6379/2"
    with pytest.raises(ValueError, match="redis:// or rediss://") as caught:
        Settings(store_url="postgres://user:s3cret@db/x")
    assert "s3cret" not in str(caught.value)



def test_sqlite_reads_on_the_loop_without_waiting_for_a_writer_and_falls_back_when_busy(tmp_path) -> None:
    """`get` reads on the event loop through its own connection: a writer holding the database
    (a registration's transaction on another connection) neither blocks it nor shows it a
    half-written task; and when SQLite answers busy, the read goes to the worker thread."""
    import sqlite3

    path = tmp_path / "tasks.sqlite3"
    task, other = info("t1"), info("t2")

    class Counted:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db, self.calls = db, 0

        def execute(self, *args: object) -> sqlite3.Cursor:
            self.calls += 1
            return self.db.execute(*args)

    async def scenario(store: SqliteTaskStore) -> None:
        await store.add(task, support(3))
        store._reader = counted = Counted(store._reader)
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM tasks WHERE task_id = 't1'")
        try:
            assert (await store.get("", "t1")).task_id == "t1"  # the committed version, at once
            assert counted.calls == 1
        finally:
            writer.execute("ROLLBACK")
            writer.close()

        class Busy:
            def execute(self, *args: object) -> None:
                raise sqlite3.OperationalError("database is locked")

        store._reader = Busy()
        try:
            await store.add(other, support(2))
            assert (await store.get("", "t2")).task_id == "t2"  # through the worker thread
            with pytest.raises(TaskNotFound):
                await store.get("", "nope")
        finally:
            store._reader = counted.db

    run(SqliteTaskStore(path), scenario=scenario)


def test_sqlite_refuses_reads_once_closed(tmp_path) -> None:
    store = SqliteTaskStore(tmp_path / "tasks.sqlite3")

    async def scenario() -> None:
        await store.open()
        await store.add(info("t1"), support(1))
        await store.close()
        with pytest.raises(RuntimeError, match="not open"):
            await store.get("", "t1")

    asyncio.run(scenario())


def _open_at(path: Path, start: object, results: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    try:
        store = SqliteTaskStore(path)
        store._open()
        store._close()
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the test, not lost in a child
        results.put(repr(exc))  # type: ignore[attr-defined]


def test_server_processes_opening_a_new_sqlite_database_at_once_all_start(tmp_path) -> None:
    # Only one connection can switch a new database to WAL; SQLite refused the others at once
    # ("database is locked") in 6 of 40 such starts before the store retried it. A server of
    # several processes failed to start on that.
    context = multiprocessing.get_context("fork")
    failures = []
    for trial in range(30):
        path = tmp_path / f"{trial}" / "tasks.db"
        start, results = context.Barrier(4), context.Queue()
        children = [context.Process(target=_open_at, args=(path, start, results)) for _ in range(4)]
        for child in children:
            child.start()
        outcomes = [results.get(timeout=60) for _ in children]
        for child in children:
            child.join(60)
        failures += [o for o in outcomes if o != "ok"]
    assert failures == []
