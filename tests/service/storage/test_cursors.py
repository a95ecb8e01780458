"""List cursors: opaque (they do not reveal the global creation order, which would tell a tenant
how busy the others are), bound to their owner, and still valid after the store is reopened."""

from __future__ import annotations

import asyncio
import base64
import itertools
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from service.errors import InvalidInput
from service.storage.cursors import Cursors
from service.storage.records import TaskInfo
from service.storage.sqlite import SqliteTaskStore


def test_a_cursor_opens_to_the_sequence_number_it_sealed() -> None:
    cursors = Cursors(b"k" * 32)
    for seq in (0, 1, 2, 1000, 2**32 + 7, 2**62):
        assert cursors.open("alice", cursors.seal("alice", seq)) == seq


def test_consecutive_sequence_numbers_give_unrelated_looking_cursors() -> None:
    cursors = Cursors(b"k" * 32)
    raw = [base64.urlsafe_b64decode(cursors.seal("alice", seq) + "==")[:8] for seq in range(1, 200)]
    values = [int.from_bytes(r, "big") for r in raw]
    assert len(set(values)) == len(values)
    assert values != sorted(values)
    # Neighbours differ in about half their bits, not in the last few as counters do.
    assert np.mean([bin(a ^ b).count("1") for a, b in itertools.pairwise(values)]) > 24


@pytest.mark.parametrize("cursor", ["", "garbage", "not-a-cursor", "é", "A" * 22, "eyJhZnRlciI6IDN9"])
def test_a_cursor_the_service_did_not_hand_out_is_refused(cursor: str) -> None:
    with pytest.raises(InvalidInput, match="not a cursor"):
        Cursors(b"k" * 32).open("alice", cursor)


def test_a_cursor_is_refused_for_another_owner_and_under_another_key() -> None:
    cursor = Cursors(b"k" * 32).seal("alice", 5)
    with pytest.raises(InvalidInput):
        Cursors(b"k" * 32).open("bob", cursor)
    with pytest.raises(InvalidInput):
        Cursors(b"j" * 32).open("alice", cursor)


def test_cursors_outlive_a_reopened_store(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    support = np.zeros((2, 28, 28), dtype=np.float32)

    async def scenario() -> None:
        store = SqliteTaskStore(tmp_path / "tasks.sqlite3")
        await store.open()
        for i in range(3):
            await store.add(TaskInfo(f"t{i}", "alice", None, ("a", "b"), "v", 1, now, now), support)
        first = await store.page("alice", 1, None)
        await store.close()

        reopened = SqliteTaskStore(tmp_path / "tasks.sqlite3")
        await reopened.open()
        try:
            second = await reopened.page("alice", 1, first.next_cursor)
            assert [t.task_id for t in second.tasks] == ["t1"]
        finally:
            await reopened.close()

    asyncio.run(scenario())
