"""The embedded task store: SQLite in WAL mode, one transaction per write, committed before the
client hears 201. A data directory's server processes share it."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.errors import TaskNotFound
from service.storage.cursors import Cursors
from service.storage.records import Page, TaskChanged, TaskInfo, TaskWarning, of_json, to_json

T = TypeVar("T")
_BUSY = object()
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, never reused: list cursor
    task_id        TEXT NOT NULL UNIQUE,
    owner          TEXT NOT NULL,       -- hash of the API key that created it ('' without auth)
    name           TEXT,
    example_labels TEXT NOT NULL,       -- JSON list, one label per support example
    support        BLOB NOT NULL,       -- float32 (n, size, size), C order, little-endian
    image_size     INTEGER NOT NULL,
    model_version  TEXT NOT NULL,
    memory_bytes   INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    warnings       TEXT                 -- JSON list of {type, message, details}; NULL: none known
);
CREATE INDEX IF NOT EXISTS tasks_by_owner ON tasks (owner, seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('cursor_key', randomblob(32));  -- seals list cursors
"""
_INFO_COLUMNS = ("task_id, owner, name, example_labels, model_version, memory_bytes, created_at, updated_at,"
                 " warnings")
# Columns added after a store's first version: an older database gets them on open (its rows NULL),
# and the older code that wrote it never names them, so either version runs on it.
_ADDED_COLUMNS = {"warnings": "TEXT"}


class SqliteTaskStore:
    """SQLite in WAL mode, one connection behind a lock; every call runs in the threadpool, but for
    `get` (see there)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # query-only, used on the event loop alone
        self._lock = threading.Lock()
        self._cursors = Cursors(b"")  # keyed from the database on open

    def __str__(self) -> str:
        return f"SQLite at {self.path}"

    async def open(self) -> None:
        await run_in_threadpool(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=5000")
        _while_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the client hears 201
        _while_locked(lambda: db.executescript(_SCHEMA))  # each statement of it can be run again
        _while_locked(lambda: _add_missing_columns(db))
        self._cursors = Cursors(db.execute("SELECT value FROM meta WHERE name = 'cursor_key'").fetchone()[0])
        reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        reader.execute("PRAGMA query_only=ON")
        reader.execute("PRAGMA busy_timeout=0")  # never wait on the event loop: fall back instead
        self._db, self._reader = db, reader

    async def close(self) -> None:
        reader, self._reader = self._reader, None  # on the loop, so no `get` is halfway through it
        if reader is not None:
            reader.close()
        await run_in_threadpool(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1 FROM tasks LIMIT 1").fetchall())

    async def count(self) -> int:
        return await self._run(lambda db: db.execute("SELECT count(*) FROM tasks").fetchone()[0])

    async def add(self, info: TaskInfo, support: np.ndarray) -> None:
        def insert(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "INSERT INTO tasks (task_id, owner, name, example_labels, support, image_size,"
                    " model_version, memory_bytes, created_at, updated_at, warnings)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (info.task_id, info.owner, info.name, json.dumps(info.example_labels),
                     _to_blob(support), support.shape[-1], info.model_version, info.memory_bytes,
                     _to_text(info.created_at), _to_text(info.updated_at), to_json(info.warnings)),
                )
        await self._run(insert)

    async def get(self, owner: str, task_id: str) -> TaskInfo:
        """Read on the event loop itself, on a connection of its own: every classify request reads
        its task, and a primary-key lookup in WAL mode (readers never wait for the writer) takes
        microseconds, less than the hop to a worker thread and back. Should SQLite still answer
        busy (WAL recovery after a crash), the read goes to the worker thread like the rest."""
        sql = f"SELECT {_INFO_COLUMNS} FROM tasks WHERE owner = ? AND task_id = ?"
        row: Any = _BUSY
        if self._reader is not None:
            try:
                row = self._reader.execute(sql, (owner, task_id)).fetchone()
            except sqlite3.OperationalError:
                row = _BUSY
        if row is _BUSY:
            row = await self._run(lambda db: db.execute(sql, (owner, task_id)).fetchone())
        if row is None:
            raise TaskNotFound(task_id)
        return _to_info(row)

    async def load(self, owner: str, task_id: str) -> tuple[TaskInfo, np.ndarray]:
        row = await self._run(lambda db: db.execute(
            f"SELECT {_INFO_COLUMNS}, support, image_size FROM tasks WHERE owner = ? AND task_id = ?",
            (owner, task_id),
        ).fetchone())
        if row is None:
            raise TaskNotFound(task_id)
        blob, size = row[-2:]
        return _to_info(row[:-2]), np.frombuffer(blob, dtype="<f4").reshape(-1, size, size).astype(np.float32)

    async def page(self, owner: str, limit: int, cursor: str | None) -> Page:
        after = self._cursors.open(owner, cursor)
        rows = await self._run(lambda db: db.execute(
            f"SELECT seq, {_INFO_COLUMNS} FROM tasks WHERE owner = ? AND seq > ? ORDER BY seq LIMIT ?",
            (owner, after, limit + 1),
        ).fetchall())
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = self._cursors.seal(owner, rows[-1][0]) if more else None
        return Page([_to_info(row[1:]) for row in rows], next_cursor)

    async def replace_support(self, info: TaskInfo, support: np.ndarray, if_updated_at: datetime) -> None:
        def update(db: sqlite3.Connection) -> None:
            with _transaction(db):
                row = db.execute("SELECT updated_at FROM tasks WHERE owner = ? AND task_id = ?",
                                 (info.owner, info.task_id)).fetchone()
                if row is None:
                    raise TaskNotFound(info.task_id)
                if row[0] != _to_text(if_updated_at):
                    raise TaskChanged(info.task_id)
                db.execute(
                    "UPDATE tasks SET example_labels = ?, support = ?, model_version = ?,"
                    " memory_bytes = ?, updated_at = ?, warnings = ? WHERE owner = ? AND task_id = ?",
                    (json.dumps(info.example_labels), _to_blob(support), info.model_version,
                     info.memory_bytes, _to_text(info.updated_at), to_json(info.warnings),
                     info.owner, info.task_id),
                )
        await self._run(update)

    async def rebind(
        self, owner: str, task_id: str, model_version: str, memory_bytes: int,
        warnings: Sequence[TaskWarning] | None = None,
    ) -> None:
        def update(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "UPDATE tasks SET model_version = ?, memory_bytes = ?, warnings = coalesce(?, warnings)"
                    " WHERE owner = ? AND task_id = ?",
                    (model_version, memory_bytes, None if warnings is None else to_json(warnings),
                     owner, task_id),
                )
        await self._run(update)

    async def delete(self, owner: str, task_id: str) -> None:
        def remove(db: sqlite3.Connection) -> int:
            with _transaction(db):
                return db.execute(
                    "DELETE FROM tasks WHERE owner = ? AND task_id = ?", (owner, task_id)
                ).rowcount
        if await self._run(remove) == 0:
            raise TaskNotFound(task_id)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                if self._db is None:
                    raise RuntimeError("the task store is not open")
                return fn(self._db)
        return await run_in_threadpool(locked)


def _while_locked(step: Callable[[], object], seconds: float = 10.0) -> None:
    """Run `step`, again while the database is locked, for up to `seconds`. The server processes
    of one data directory open it at once, and on a new database only one of them can switch it to
    WAL: SQLite answers the others "database is locked" at once, without its busy handler (a wait
    there could deadlock), 6 times in 40 for four processes opening one new file together."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            locked = (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not locked or time.monotonic() > deadline:
                raise
        time.sleep(random.uniform(0.005, 0.02))


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: no half-written task is ever visible."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _to_blob(support: np.ndarray) -> bytes:
    return np.ascontiguousarray(support, dtype="<f4").tobytes()


def _to_text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _to_info(row: tuple) -> TaskInfo:
    task_id, owner, name, labels, version, nbytes, created, updated, warnings = row
    return TaskInfo(task_id, owner, name, tuple(json.loads(labels)), version, nbytes,
                    datetime.fromisoformat(created), datetime.fromisoformat(updated), of_json(warnings))


def _add_missing_columns(db: sqlite3.Connection) -> None:
    present = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    for name, declaration in _ADDED_COLUMNS.items():
        if name not in present:
            try:
                db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {declaration}")
            except sqlite3.OperationalError as exc:  # another server process added it first
                if "duplicate column" not in str(exc):
                    raise
