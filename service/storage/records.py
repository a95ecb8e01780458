"""What a task store keeps and the one interface every store offers (`TaskStore`).

A task's preprocessed support set is the truth: memories are never stored, they are rebuilt from
it, deterministically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import numpy as np


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


class TaskChanged(Exception):
    """The task was written (by another request or replica) since the caller read it."""


def to_json(warnings: Sequence[TaskWarning]) -> str:
    return json.dumps([{"type": w.type, "message": w.message, "details": w.details} for w in warnings])


def of_json(text: str | bytes | None) -> tuple[TaskWarning, ...]:
    """Stored warnings; none for a task stored before they were (NULL, or no such field)."""
    if text is None:
        return ()
    return tuple(TaskWarning(w["type"], w["message"], w["details"]) for w in json.loads(text))
