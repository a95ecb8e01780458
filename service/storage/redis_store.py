"""Redis task store: the same source of truth as SQLite, shared by every replica of the service.

Chosen with `METANET_STORE_URL=redis://...`. Each write is one Lua script, so a task appears whole
or not at all; durability is Redis's own (run it with `appendonly yes`, `appendfsync always`).

Keys (all under `metanet:`):
    task:{task_id}   hash: owner, name (JSON), example_labels (JSON), support (float32 bytes,
                     C order, little-endian), image_size, model_version, memory_bytes,
                     created_at, updated_at, seq, warnings (JSON; absent in tasks stored
                     before there were warnings: none known)
    owner:{owner}    sorted set of the owner's task ids by seq: the list, in creation order
    tasks            sorted set of every task id by seq: the count
    seq              counter: creation order, never reused
    cursor_key       32 random bytes that seal list cursors, the same for every replica
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from service.errors import NotReady, TaskNotFound
from service.storage.cursors import Cursors
from service.storage.records import Page, TaskChanged, TaskInfo, TaskWarning, of_json, to_json

NS = "metanet:"
_INFO_FIELDS = ("owner", "name", "example_labels", "model_version", "memory_bytes", "created_at",
                "updated_at", "warnings")

# KEYS: task, owner's list, all tasks, seq counter. ARGV: task_id, owner, created_at, field/value...
# A task that already exists with this owner and created_at is this very call, retried by the
# client after a lost reply: report success rather than a conflict.
_ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local was = redis.call('HMGET', KEYS[1], 'owner', 'created_at')
  if was[1] == ARGV[2] and was[2] == ARGV[3] then return 1 end
  return 0
end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
return 1
"""

# KEYS: task. ARGV: owner, updated_at the caller read, updated_at it writes, field/value...
# Returns 0: no such task (for this owner); 1: written (or already written by a retried call);
# 2: someone wrote the task since the caller read it.
_REPLACE = """
local was = redis.call('HMGET', KEYS[1], 'owner', 'updated_at')
if was[1] ~= ARGV[1] then return 0 end
if was[2] == ARGV[3] then return 1 end
if was[2] ~= ARGV[2] then return 2 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
return 1
"""

# KEYS: task. ARGV: owner, model_version, memory_bytes[, warnings]. Never creates a (half) task.
_REBIND = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'model_version', ARGV[2], 'memory_bytes', ARGV[3])
if ARGV[4] then redis.call('HSET', KEYS[1], 'warnings', ARGV[4]) end
return 1
"""

# KEYS: task, owner's list, all tasks. ARGV: owner, task_id.
_DELETE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""


class RedisTaskStore:
    """One connection pool per process; replicas share the data, never their caches."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._redis: redis.Redis | None = None
        self._cursors = Cursors(b"")  # keyed from Redis on open

    def __str__(self) -> str:
        parts = urlsplit(self.url)
        if parts.password is None:
            return f"Redis at {self.url}"
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return f"Redis at {urlunsplit(parts._replace(netloc=netloc))}"

    async def open(self) -> None:
        # A dropped connection (Redis restarting, a failover) is retried briefly; past that the
        # request gets 503 and /readyz says the store is unreachable.
        self._redis = redis.Redis.from_url(
            self.url, socket_timeout=self._timeout_s, socket_connect_timeout=self._timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3), health_check_interval=30,
        )
        self._add = self._redis.register_script(_ADD)
        self._replace = self._redis.register_script(_REPLACE)
        self._rebind = self._redis.register_script(_REBIND)
        self._delete = self._redis.register_script(_DELETE)
        async with self._reachable():
            await self._redis.set(NS + "cursor_key", secrets.token_bytes(32), nx=True)
            self._cursors = Cursors(await self._redis.get(NS + "cursor_key"))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def ping(self) -> None:
        await self._client.ping()

    async def count(self) -> int:
        async with self._reachable():
            return await self._client.zcard(NS + "tasks")

    async def add(self, info: TaskInfo, support: np.ndarray) -> None:
        fields = {
            "owner": info.owner, "name": json.dumps(info.name),
            "example_labels": json.dumps(info.example_labels), "support": _to_bytes(support),
            "image_size": support.shape[-1], "model_version": info.model_version,
            "memory_bytes": info.memory_bytes, "created_at": _to_text(info.created_at),
            "updated_at": _to_text(info.updated_at), "warnings": to_json(info.warnings),
        }
        keys = [_task(info.task_id), _owner(info.owner), NS + "tasks", NS + "seq"]
        async with self._reachable():
            added = await self._add(keys, [info.task_id, info.owner, fields["created_at"], *_flat(fields)])
        if not added:
            raise ValueError(f"a task {info.task_id!r} already exists")

    async def get(self, owner: str, task_id: str) -> TaskInfo:
        async with self._reachable():
            values = await self._client.hmget(_task(task_id), _INFO_FIELDS)
        return _to_info(owner, task_id, values)

    async def load(self, owner: str, task_id: str) -> tuple[TaskInfo, np.ndarray]:
        async with self._reachable():
            values = await self._client.hmget(_task(task_id), [*_INFO_FIELDS, "support", "image_size"])
        info = _to_info(owner, task_id, values[:-2])
        blob, size = values[-2:]
        return info, np.frombuffer(blob, dtype="<f4").reshape(-1, int(size), int(size)).astype(np.float32)

    async def page(self, owner: str, limit: int, cursor: str | None) -> Page:
        after = self._cursors.open(owner, cursor)
        async with self._reachable():
            ids = await self._client.zrangebyscore(_owner(owner), f"({after}", "+inf", start=0,
                                                   num=limit + 1, withscores=True)
            more = len(ids) > limit
            ids = ids[:limit]
            async with self._client.pipeline(transaction=False) as pipe:
                for task_id, _ in ids:
                    pipe.hmget(_task(task_id.decode()), _INFO_FIELDS)
                rows = await pipe.execute()
        # A task deleted between the two reads is left out; the cursor still moves past it.
        tasks = [_to_info(owner, task_id.decode(), values)
                 for (task_id, _), values in zip(ids, rows, strict=True) if values[0] is not None]
        next_cursor = self._cursors.seal(owner, int(ids[-1][1])) if more else None
        return Page(tasks, next_cursor)

    async def replace_support(self, info: TaskInfo, support: np.ndarray, if_updated_at: datetime) -> None:
        fields = {
            "example_labels": json.dumps(info.example_labels), "support": _to_bytes(support),
            "image_size": support.shape[-1], "model_version": info.model_version,
            "memory_bytes": info.memory_bytes, "updated_at": _to_text(info.updated_at),
            "warnings": to_json(info.warnings),
        }
        args = [info.owner, _to_text(if_updated_at), fields["updated_at"], *_flat(fields)]
        async with self._reachable():
            outcome = await self._replace([_task(info.task_id)], args)
        if outcome == 0:
            raise TaskNotFound(info.task_id)
        if outcome == 2:
            raise TaskChanged(info.task_id)

    async def rebind(
        self, owner: str, task_id: str, model_version: str, memory_bytes: int,
        warnings: Sequence[TaskWarning] | None = None,
    ) -> None:
        args: list[object] = [owner, model_version, memory_bytes]
        if warnings is not None:
            args.append(to_json(warnings))
        async with self._reachable():
            await self._rebind([_task(task_id)], args)

    async def delete(self, owner: str, task_id: str) -> None:
        async with self._reachable():
            deleted = await self._delete([_task(task_id), _owner(owner), NS + "tasks"], [owner, task_id])
        if not deleted:
            raise TaskNotFound(task_id)

    @property
    def _client(self) -> redis.Redis:
        if self._redis is None:
            raise RuntimeError("the task store is not open")
        return self._redis

    @asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        """Redis out of reach (after the client's retries) is the service not being ready: 503."""
        try:
            yield
        except (ConnectionError, TimeoutError) as exc:
            raise NotReady(f"the task store is unreachable: {exc}", headers={"Retry-After": "5"}) from exc


def _task(task_id: str) -> str:
    return f"{NS}task:{task_id}"


def _owner(owner: str) -> str:
    return f"{NS}owner:{owner}"


def _flat(fields: dict[str, object]) -> list[object]:
    return [item for pair in fields.items() for item in pair]


def _to_bytes(support: np.ndarray) -> bytes:
    return np.ascontiguousarray(support, dtype="<f4").tobytes()


def _to_text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _to_info(owner: str, task_id: str, values: list[bytes | None]) -> TaskInfo:
    """The task's fields as HMGET returned them (`_INFO_FIELDS`); another owner's task is not found."""
    stored_owner, name, labels, version, nbytes, created, updated, warnings = values
    if stored_owner is None or stored_owner.decode() != owner:
        raise TaskNotFound(task_id)
    return TaskInfo(task_id, owner, json.loads(name), tuple(json.loads(labels)), version.decode(),
                    int(nbytes), datetime.fromisoformat(created.decode()),
                    datetime.fromisoformat(updated.decode()), of_json(warnings))
