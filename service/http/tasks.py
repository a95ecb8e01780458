"""What the routes do: check limits, run the model (through the engine), persist, cache.

Every check happens before the first write, and each write is one store transaction, so a
rejected request changes nothing. Per-task locks serialise rebuilds and updates of one task in
this process; across replicas, updates are compare-and-set on `updated_at`, and a cached memory
is used only while it is at least as new as the task the store returns.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import numpy as np

from service.errors import InvalidInput, TooManyRequests
from service.http.schemas import AttentionWeight, Example, LabelProbability, Prediction
from service.inference.engine import Call, Engine, Memory, Scores
from service.inference.intake import ImageInput
from service.settings import Settings
from service.storage.cache import ByteLRU
from service.storage.records import Page, TaskChanged, TaskInfo, TaskStore, TaskWarning

_NO_LIMIT = Call()
_UPDATE_ATTEMPTS = 5  # compare-and-set rounds of one add_examples racing writers on other replicas


class Cached(NamedTuple):
    memory: Memory
    updated_at: datetime  # the version of the task the memory was built from


class TaskService:
    def __init__(self, store: TaskStore, engine: Engine, settings: Settings, n_tasks: int) -> None:
        self.store = store
        self.engine = engine
        self.cache: ByteLRU[Cached] = ByteLRU(settings.cache_bytes)
        self.max_examples = min(settings.max_examples, engine.info.max_examples)
        self.max_images = settings.max_images_per_request
        self.n_tasks = n_tasks  # for the tasks gauge; counted once at startup, then kept current
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # ------------------------------------------------------------------------------- tasks

    async def register(
        self, owner: str, name: str | None, examples: Sequence[Example], call: Call = _NO_LIMIT
    ) -> TaskInfo:
        labels = [e.label for e in examples]
        self._check_support(labels, field="examples")
        support = await self.engine.prepare([e.image for e in examples], lambda i: f"examples[{i}].image")
        memory = await self.engine.register(support, labels, call=call, check=True)
        now = datetime.now(UTC)
        info = TaskInfo(uuid.uuid4().hex, owner, name, tuple(labels), self.engine.info.version,
                        memory.nbytes, now, now, support_warnings(memory))
        await self.store.add(info, support)
        self.cache.put(info.task_id, Cached(memory, info.updated_at), memory.nbytes)
        self.n_tasks += 1
        return info

    async def get(self, owner: str, task_id: str) -> TaskInfo:
        return await self.store.get(owner, task_id)

    async def page(self, owner: str, limit: int, cursor: str | None) -> Page:
        return await self.store.page(owner, limit, cursor)

    async def delete(self, owner: str, task_id: str) -> None:
        # Other replicas may still cache the memory; they never serve it, as every request first
        # reads the task from the store, and the LRU drops it in time.
        async with self._lock(task_id):
            await self.store.delete(owner, task_id)
            self.cache.pop(task_id)
            self.n_tasks -= 1

    async def add_examples(self, owner: str, task_id: str, examples: Sequence[Example]) -> TaskInfo:
        labels = [e.label for e in examples]
        added: np.ndarray | None = None
        async with self._lock(task_id):
            for _ in range(_UPDATE_ATTEMPTS):
                info, support = await self.store.load(owner, task_id)
                self._check_support(labels, field="examples", existing=info.example_labels)
                if added is None:
                    added = await self.engine.prepare([e.image for e in examples],
                                                      lambda i: f"examples[{i}].image")
                support = np.concatenate([support, added])
                memory = await self.engine.register(support, [*info.example_labels, *labels],
                                                    offset=len(info.example_labels), check=True)
                grown = replace(info, example_labels=(*info.example_labels, *labels),
                                model_version=self.engine.info.version, memory_bytes=memory.nbytes,
                                updated_at=_later_than(info.updated_at), warnings=support_warnings(memory))
                try:
                    await self.store.replace_support(grown, support, if_updated_at=info.updated_at)
                except TaskChanged:
                    continue  # another replica wrote the task meanwhile: start again from its version
                self.cache.put(task_id, Cached(memory, grown.updated_at), memory.nbytes)
                return grown
        raise TooManyRequests("the task kept changing under this request; retry it",
                              headers={"Retry-After": "1"})

    # ---------------------------------------------------------------------------- classify

    async def classify(
        self, owner: str, task_id: str, images: Sequence[ImageInput], top_k: int, explain: bool,
        call: Call = _NO_LIMIT, min_confidence: float = 0.0,
    ) -> list[Prediction]:
        info = await self.store.get(owner, task_id)
        self._check_count(len(images), field="images")
        # A place in the model's queue first (429 when full), then the memory and the decoding.
        with self.engine.admit(len(images)) as admission:
            memory = await self._memory(info)
            scores = await self.engine.classify(memory, images, explain, call, admission)
        return _predictions(scores, memory, top_k, min_confidence)

    async def classify_once(
        self, support: Sequence[Example], images: Sequence[ImageInput], top_k: int, explain: bool,
        call: Call = _NO_LIMIT, min_confidence: float = 0.0,
    ) -> list[Prediction]:
        labels = [e.label for e in support]
        self._check_support(labels, field="support")
        self._check_count(len(images), field="images")
        support_x = await self.engine.prepare([e.image for e in support], lambda i: f"support[{i}].image")
        memory = await self.engine.register(support_x, labels, field="support", call=call)
        scores = await self.engine.classify(memory, images, explain, call)
        return _predictions(scores, memory, top_k, min_confidence)

    # ----------------------------------------------------------------------------- helpers

    async def _memory(self, info: TaskInfo) -> Memory:
        """The task's memory from the cache, else rebuilt from its stored support set.

        `info` was just read from the store: a cached memory older than it (another replica added
        examples since) is rebuilt from the store's current version."""
        cached = self.cache.get(info.task_id)
        if cached is not None and cached.updated_at >= info.updated_at:
            return cached.memory
        async with self._lock(info.task_id):
            cached = self.cache.peek(info.task_id)  # a request we waited on may have built it
            if cached is not None and cached.updated_at >= info.updated_at:
                return cached.memory
            info, support = await self.store.load(info.owner, info.task_id)
            version = self.engine.info.version
            # New weights since the task was built: its warnings are theirs to find again.
            new_weights = info.model_version != version
            memory = await self.engine.register(support, info.example_labels, check=new_weights)
            if new_weights or info.memory_bytes != memory.nbytes:
                # Record what its memory now comes from.
                warnings = support_warnings(memory) if new_weights else None
                await self.store.rebind(info.owner, info.task_id, version, memory.nbytes, warnings)
            self.cache.put(info.task_id, Cached(memory, info.updated_at), memory.nbytes)
            return memory

    def _check_support(self, labels: Sequence[str], field: str, existing: Sequence[str] = ()) -> None:
        """The model's limits, checked before any image is decoded."""
        self._check_count(len(labels), field)
        n_examples = len(existing) + len(labels)
        if n_examples > self.max_examples:
            raise InvalidInput(
                f"a task holds at most {self.max_examples} examples; this one would hold {n_examples}",
                field=field,
            )
        n_way = len(set(existing) | set(labels))
        if n_way < 2:
            raise InvalidInput(f"a task needs at least 2 distinct labels, got {n_way}", field=field)
        if n_way > self.engine.info.max_way:
            raise InvalidInput(
                f"a task may have at most max_way={self.engine.info.max_way} distinct labels; "
                f"this one would have {n_way}",
                field=field,
            )

    def _check_count(self, n_images: int, field: str) -> None:
        if n_images > self.max_images:
            raise InvalidInput(
                f"{n_images} images in one request; at most {self.max_images} are allowed", field=field
            )

    def _lock(self, task_id: str) -> asyncio.Lock:
        lock = self._locks.get(task_id)
        if lock is None:
            lock = self._locks[task_id] = asyncio.Lock()
        return lock


def _later_than(moment: datetime) -> datetime:
    """Now, or just after `moment` if a replica's clock is behind: versions only move forward."""
    return max(datetime.now(UTC), moment + timedelta(microseconds=1))


def _predictions(scores: Scores, memory: Memory, top_k: int, min_confidence: float = 0.0) -> list[Prediction]:
    k = min(top_k, len(memory.labels))
    predictions = []
    for i, probs in enumerate(scores.probs):
        best = np.argsort(-probs, kind="stable")[:k]
        top = [LabelProbability(label=memory.labels[j], probability=float(probs[j])) for j in best]
        attention = None
        if scores.attention is not None:
            attention = [
                AttentionWeight(example_index=j, label=memory.example_labels[j], weight=float(w))
                for j, w in enumerate(scores.attention[i])
            ]
        confidence = top[0].probability
        predictions.append(Prediction(
            label=top[0].label if confidence >= min_confidence else None, confidence=confidence,
            support_similarity=float(scores.similarity[i]), top_k=top, attention=attention,
        ))
    return predictions


def support_warnings(memory: Memory) -> tuple[TaskWarning, ...]:
    """The registration warnings of a memory built with check=True (docs/api.md): each example
    its own task classifies as another label, then each pair of examples of different labels the
    model cannot tell apart."""
    report = memory.report
    if report is None:
        raise ValueError("the memory was built without checking its support set")
    warnings = []
    for i, (label, got, p) in enumerate(zip(memory.example_labels, report.predicted, report.confidence,
                                            strict=True)):
        if got != label:
            warnings.append(TaskWarning(
                "misclassified_example",
                f"example {i} ({label!r}) is classified as {got!r} ({p:.1%}) by its own task: queries "
                f"like it may get {got!r}; check its label, or add clearer examples of {label!r}",
                {"example_index": i, "label": label, "predicted_label": got, "confidence": p},
            ))
    for i, j, cosine in report.confusable:
        a, b = memory.example_labels[i], memory.example_labels[j]
        warnings.append(TaskWarning(
            "indistinguishable_examples",
            f"examples {i} ({a!r}) and {j} ({b!r}) look the same to the model (cosine {cosine:.3f}): "
            f"queries like them may get either label; is one of them mislabelled or a duplicate?",
            {"example_indices": [i, j], "labels": [a, b], "cosine": cosine},
        ))
    return tuple(warnings)
