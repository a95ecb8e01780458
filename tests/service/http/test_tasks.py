"""TaskService as replicas run it: two services over one store, each with its own cache. A memory
older than the stored task is rebuilt, and an update that lost a race is redone, not lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from service.errors import TaskNotFound
from service.http.schemas import Example
from service.http.tasks import TaskService, support_warnings
from service.inference.engine import Memory, ModelInfo, SupportReport
from service.inference.intake import ImageInput, ImageLimits, model_inputs
from service.settings import Settings
from service.storage import SqliteTaskStore, TaskInfo, TaskStore
from service.storage.redis_store import RedisTaskStore

SIZE = 4


class CountingEngine:
    """Stands in for the model: a memory is its support set; counts the registrations."""

    info = ModelInfo("stub", "stub-1", max_way=10, max_examples=20, image_size=SIZE, backend="stub",
                     device="cpu")

    def __init__(self) -> None:
        self.registrations = 0

    async def register(self, support: np.ndarray, labels: Sequence[str], field: str = "examples",
                       offset: int = 0, call: object = None, check: bool = False) -> Memory:
        self.registrations += 1
        # Checked: every example classifies as its own label, but for one labelled "odd".
        report = SupportReport(tuple("x" if label == "odd" else label for label in labels),
                               (0.9,) * len(labels), ()) if check else None
        return Memory(support.copy(), tuple(dict.fromkeys(labels)), tuple(labels), support.nbytes, report)

    async def prepare(self, images: Sequence[ImageInput], field_of: Callable[[int], str]) -> np.ndarray:
        return model_inputs(images, ImageLimits(1 << 20, 1 << 20), SIZE)


def example(label: str, seed: int) -> Example:
    pixels = (np.random.default_rng(seed).random((SIZE, SIZE)) > 0.5) * 255
    pixels[0, 0], pixels[0, 1] = 0, 255  # never blank
    return Example.model_validate({"label": label, "image": {"pixels": pixels.astype(int).tolist()}})


@pytest.fixture(params=["sqlite", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[TaskStore, TaskStore]:
    """Two stores over one database: what two replicas hold."""
    if request.param == "sqlite":
        return SqliteTaskStore(tmp_path / "t.sqlite3"), SqliteTaskStore(tmp_path / "t.sqlite3")
    url = request.getfixturevalue("redis_server")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return RedisTaskStore(url), RedisTaskStore(url)


def replicas(stores: tuple[TaskStore, TaskStore], scenario) -> None:
    async def main() -> None:
        services = []
        for store in stores:
            await store.open()
            services.append(TaskService(store, CountingEngine(), Settings(), 0))
        try:
            await scenario(*services)
        finally:
            for store in stores:
                await store.close()
    asyncio.run(main())


async def memory_of(service: TaskService, task: TaskInfo) -> Memory:
    """What classify uses: the task read from the store, then its memory."""
    return await service._memory(await service.get(task.owner, task.task_id))


def test_a_replica_rebuilds_a_memory_older_than_the_stored_task(stores) -> None:
    async def scenario(a: TaskService, b: TaskService) -> None:
        task = await a.register("", "t", [example("x", 0), example("y", 1)])
        assert (await memory_of(b, task)).example_labels == ("x", "y")  # rebuilt from the store
        assert (await memory_of(b, task)).example_labels == ("x", "y")  # then cached
        assert b.engine.registrations == 1

        grown = await a.add_examples("", task.task_id, [example("z", 2)])
        assert grown.updated_at > task.updated_at
        memory = await memory_of(b, task)
        assert memory.example_labels == ("x", "y", "z")
        np.testing.assert_array_equal(memory.state, (await memory_of(a, task)).state)
        assert b.engine.registrations == 2

        await a.delete("", task.task_id)
        with pytest.raises(TaskNotFound):
            await memory_of(b, task)
    replicas(stores, scenario)


def test_examples_added_on_two_replicas_at_once_are_all_kept(stores) -> None:
    async def scenario(a: TaskService, b: TaskService) -> None:
        task = await a.register("", "t", [example("x", 0), example("y", 1)])
        write = a.store.replace_support
        raced = False

        async def racing_write(*args, **kwargs) -> None:
            # b adds its example after a read the task and before a writes: a's write must not undo b's.
            nonlocal raced
            if not raced:
                raced = True
                await b.add_examples("", task.task_id, [example("from-b", 3)])
            await write(*args, **kwargs)

        a.store.replace_support = racing_write  # type: ignore[method-assign]
        grown = await a.add_examples("", task.task_id, [example("from-a", 2)])
        assert grown.example_labels == ("x", "y", "from-b", "from-a")
        stored, support = await b.store.load("", task.task_id)
        assert stored == grown and len(support) == 4
        assert (await memory_of(b, task)).example_labels == grown.example_labels
    replicas(stores, scenario)


class NewWeightsEngine(CountingEngine):
    """The same stand-in under other weights, which classify every example as its own label."""

    info = ModelInfo("stub", "stub-2", max_way=10, max_examples=20, image_size=SIZE, backend="stub",
                     device="cpu")

    async def register(self, support: np.ndarray, labels: Sequence[str], field: str = "examples",
                       offset: int = 0, call: object = None, check: bool = False) -> Memory:
        memory = await super().register(support, labels, field, offset, call, check)
        if memory.report is None:
            return memory
        return Memory(memory.state, memory.labels, memory.example_labels, memory.nbytes,
                      SupportReport(tuple(labels), memory.report.confidence, ()))


def test_warnings_follow_the_support_set_and_the_weights_on_every_replica(stores) -> None:
    async def scenario(a: TaskService, b: TaskService) -> None:
        task = await a.register("", "t", [example("x", 0), example("odd", 1)])
        [warning] = task.warnings
        assert (warning.type, warning.details) == ("misclassified_example", {
            "example_index": 1, "label": "odd", "predicted_label": "x", "confidence": 0.9})
        assert (await b.get("", task.task_id)).warnings == task.warnings  # stored with the task

        grown = await a.add_examples("", task.task_id, [example("y", 2), example("odd", 3)])
        assert [w.details["example_index"] for w in grown.warnings] == [1, 3]  # the whole support set
        assert (await b.get("", task.task_id)).warnings == grown.warnings

        b.engine = NewWeightsEngine()  # b restarted on new weights: its rebuild checks the set again
        await memory_of(b, grown)
        rebuilt = await a.get("", task.task_id)
        assert (rebuilt.model_version, rebuilt.warnings) == ("stub-2", ())
        registrations = b.engine.registrations
        await memory_of(b, rebuilt)  # cached now: no second rebuild, nothing rewritten
        assert b.engine.registrations == registrations
    replicas(stores, scenario)


def test_support_warnings_name_misclassified_examples_then_indistinguishable_pairs() -> None:
    report = SupportReport(("a", "a", "b"), (0.8, 0.6, 0.99), ((0, 2, 0.9951),))
    memory = Memory(None, ("a", "b"), ("a", "b", "b"), 0, report)
    misclassified, indistinguishable = support_warnings(memory)
    assert misclassified.type == "misclassified_example"
    assert misclassified.details == {"example_index": 1, "label": "b", "predicted_label": "a",
                                     "confidence": 0.6}
    assert "example 1 ('b') is classified as 'a' (60.0%)" in misclassified.message
    assert indistinguishable.type == "indistinguishable_examples"
    assert indistinguishable.details == {"example_indices": [0, 2], "labels": ["a", "b"], "cosine": 0.9951}
    all_well = SupportReport(("a", "b"), (1.0, 1.0), ())
    assert support_warnings(Memory(None, ("a", "b"), ("a", "b"), 0, all_well)) == ()
    with pytest.raises(ValueError, match="without checking"):
        support_warnings(Memory(None, ("a", "b"), ("a", "b"), 0))
