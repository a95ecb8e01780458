"""Task store: the durable record of every task (its preprocessed support set is the truth).

`TaskStore` is the interface the service uses; `SqliteTaskStore` (WAL, one transaction per write,
committed before the client hears 201) is the embedded default, `RedisTaskStore` (redis_store.py)
the one many replicas share; `open_store` picks one from the settings. Memories are never stored:
they are rebuilt from the support set, deterministically.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.errors import InvalidInput, TaskNotFound

if TYPE_CHECKING:
    from service.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class TaskWarning:
    """What the model found wrong with a task's support set when it was last built (docs/api.md,
    "Registration warnings"): `type` is misclassified_example or indistinguishable_examples."""

    type: str
    message: str
    details: dict[str, Any]


@dataclass(frozen=True)
class TaskInfo:
    """A task's metadata: everything but its support images."""

    task_id: str
    owner: str
    name: str | None
    example_labels: tuple[str, ...]  # one per support example, in support order
    model_version: str  # the weights its memory was last built with
    memory_bytes: int
    created_at: datetime
    updated_at: datetime
    warnings: tuple[TaskWarning, ...] = ()  # of the support set under `model_version`'s weights

    @property
    def labels(self) -> list[str]:
        """Class names in order of first appearance: class id k is labels[k]."""
        return list(dict.fromkeys(self.example_labels))

    @property
    def shots(self) -> dict[str, int]:
        shots = dict.fromkeys(self.labels, 0)
        for label in self.example_labels:
            shots[label] += 1
        return shots


@dataclass(frozen=True)
class Page:
    tasks: list[TaskInfo]
    next_cursor: str | None


class TaskStore(Protocol):
    """What the service needs from a store. Every write is atomic: all of it or none of it."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...  # raises when the store cannot be reached
    async def count(self) -> int: ...
    async def add(self, info: TaskInfo, support: np.ndarray) -> None: ...
    async def get(self, owner: str, task_id: str) -> TaskInfo: ...  # TaskNotFound
    # The task and its support set, (n, S, S) float32, read together: one version of both.
    async def load(self, owner: str, task_id: str) -> tuple[TaskInfo, np.ndarray]: ...  # TaskNotFound
    async def page(self, owner: str, limit: int, cursor: str | None) -> Page: ...
    # Only if the stored task is still at `if_updated_at` (TaskChanged if another writer came first).
    async def replace_support(
        self, info: TaskInfo, support: np.ndarray, if_updated_at: datetime
    ) -> None: ...  # TaskNotFound, TaskChanged
    # New weights: the version the memory is now built with, and (when given) the warnings under them.
    async def rebind(
        self, owner: str, task_id: str, model_version: str, memory_bytes: int,
        warnings: Sequence[TaskWarning] | None = None,
    ) -> None: ...
    async def delete(self, owner: str, task_id: str) -> None: ...  # TaskNotFound


_BUSY = object()


class TaskChanged(Exception):
    """The task was written (by another request or replica) since the caller read it."""


def open_store(settings: Settings) -> TaskStore:
    """The store the settings name: Redis for a `store_url`, else SQLite under `data_dir`."""
    if settings.store_url is None:
        return SqliteTaskStore(settings.database_path)
    from service.redis_store import RedisTaskStore  # redis-py is only needed by those who use it

    return RedisTaskStore(settings.store_url)


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
        self._cursors = _Cursors(b"")  # keyed from the database on open

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
        self._cursors = _Cursors(db.execute("SELECT value FROM meta WHERE name = 'cursor_key'").fetchone()[0])
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


def to_json(warnings: Sequence[TaskWarning]) -> str:
    return json.dumps([{"type": w.type, "message": w.message, "details": w.details} for w in warnings])


def of_json(text: str | bytes | None) -> tuple[TaskWarning, ...]:
    """Stored warnings; none for a task stored before they were (NULL, or no such field)."""
    if text is None:
        return ()
    return tuple(TaskWarning(w["type"], w["message"], w["details"]) for w in json.loads(text))


def _add_missing_columns(db: sqlite3.Connection) -> None:
    present = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    for name, declaration in _ADDED_COLUMNS.items():
        if name not in present:
            try:
                db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {declaration}")
            except sqlite3.OperationalError as exc:  # another server process added it first
                if "duplicate column" not in str(exc):
                    raise


class _Cursors:
    """List cursors that reveal nothing: `seq` is global, so in the clear it would tell a tenant
    how many tasks others created between two of its own. A cursor is the seq under a keyed
    permutation (a 4-round Feistel network over HMAC-SHA256) with a tag binding it to its owner;
    the key lives in the database, so cursors outlive a restart."""

    _ROUNDS = 4
    _MASK = 0xFFFFFFFF

    def __init__(self, key: bytes) -> None:
        self._key = key

    def seal(self, owner: str, seq: int) -> str:
        left, right = seq >> 32, seq & self._MASK
        for i in range(self._ROUNDS):
            left, right = right, left ^ self._f(i, right)
        body = ((left << 32) | right).to_bytes(8, "big")
        return base64.urlsafe_b64encode(body + self._tag(owner, body)).decode().rstrip("=")

    def open(self, owner: str, cursor: str | None) -> int:
        if cursor is None:
            return 0
        try:
            raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4))
        except ValueError:  # binascii.Error and UnicodeEncodeError alike
            raw = b""
        body, tag = raw[:8], raw[8:]
        if len(raw) != 16 or not hmac.compare_digest(tag, self._tag(owner, body)):
            raise InvalidInput("not a cursor this service handed out", field="cursor")
        value = int.from_bytes(body, "big")
        left, right = value >> 32, value & self._MASK
        for i in reversed(range(self._ROUNDS)):
            left, right = right ^ self._f(i, left), left
        return (left << 32) | right

    def _f(self, i: int, half: int) -> int:
        digest = hmac.new(self._key, bytes([i]) + half.to_bytes(4, "big"), hashlib.sha256).digest()
        return int.from_bytes(digest[:4], "big")

    def _tag(self, owner: str, body: bytes) -> bytes:
        return hmac.new(self._key, b"cursor\0" + owner.encode() + b"\0" + body, hashlib.sha256).digest()[:8]
