"""Typed results: the contract's response bodies as frozen dataclasses, parsed with `from_json`.

Unknown fields are ignored, so a newer server that adds fields does not break an older client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True, slots=True)
class RegistrationWarning:
    """Advice about a task's support set, found when it was last built (docs/api.md, "Registration
    warnings"). `type` is "misclassified_example" (details: example_index, label, predicted_label,
    confidence) or "indistinguishable_examples" (details: example_indices, labels, cosine)."""

    type: str
    message: str
    details: Mapping[str, Any]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RegistrationWarning:
        return cls(data["type"], data["message"], dict(data.get("details") or {}))


@dataclass(frozen=True, slots=True)
class Task:
    task_id: str
    name: str | None
    labels: tuple[str, ...]
    n_way: int
    n_examples: int
    shots: Mapping[str, int]
    model_version: str
    created_at: datetime
    updated_at: datetime | None
    memory_bytes: int
    # What the model found wrong with the support set; empty when all is well (or from a server
    # that predates warnings).
    warnings: tuple[RegistrationWarning, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        return cls(
            task_id=data["task_id"], name=data.get("name"), labels=tuple(data["labels"]),
            n_way=int(data["n_way"]), n_examples=int(data["n_examples"]), shots=dict(data["shots"]),
            model_version=data["model_version"], created_at=datetime.fromisoformat(data["created_at"]),
            updated_at=_time(data.get("updated_at")), memory_bytes=int(data.get("memory_bytes", 0)),
            warnings=tuple(RegistrationWarning.from_json(w) for w in data.get("warnings") or ()),
        )


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of `GET /v1/tasks`; `next_cursor` is None on the last page."""

    data: tuple[Task, ...]
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskPage:
        return cls(tuple(Task.from_json(t) for t in data["data"]), data.get("next_cursor"))


@dataclass(frozen=True, slots=True)
class LabelProbability:
    label: str
    probability: float


@dataclass(frozen=True, slots=True)
class AttentionWeight:
    """The weight of one support example (by its index in the task's support order)."""

    example_index: int
    label: str
    weight: float


@dataclass(frozen=True, slots=True)
class Prediction:
    """One query's answer. `label` is None when `confidence` was below the request's
    `min_confidence` (none of the task's labels); `support_similarity` is the query's best cosine
    similarity to the support set (low: unlike every registered example; None from a server that
    predates it)."""

    label: str | None
    confidence: float
    top_k: tuple[LabelProbability, ...]
    attention: tuple[AttentionWeight, ...] | None = None  # only when asked to explain
    support_similarity: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prediction:
        attention = data.get("attention")
        similarity = data.get("support_similarity")
        return cls(
            label=data["label"], confidence=float(data["confidence"]),
            top_k=tuple(LabelProbability(p["label"], float(p["probability"])) for p in data["top_k"]),
            attention=None if attention is None else tuple(
                AttentionWeight(int(a["example_index"]), a["label"], float(a["weight"])) for a in attention
            ),
            support_similarity=None if similarity is None else float(similarity),
        )


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    """Predictions in the order of the images sent; `task_id` is None for a one-off episode.
    Iterating, indexing and len() go over the predictions."""

    predictions: tuple[Prediction, ...]
    model_version: str
    task_id: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClassifyResult:
        return cls(tuple(Prediction.from_json(p) for p in data["predictions"]),
                   data["model_version"], data.get("task_id"))

    @property
    def labels(self) -> list[str | None]:
        return [p.label for p in self.predictions]

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, index: int) -> Prediction:
        return self.predictions[index]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    max_way: int
    max_examples: int
    image_size: int
    backend: str
    device: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        return cls(name=data["name"], version=data["version"], max_way=int(data["max_way"]),
                   max_examples=int(data["max_examples"]), image_size=int(data["image_size"]),
                   backend=data["backend"], device=data["device"])
