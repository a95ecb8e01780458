"""Request and response bodies of the HTTP contract (docs/api.md), named by role."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, TypeAdapter, WithJsonSchema
from pydantic_core import PydanticCustomError

from service.errors import InvalidImage
from service.inference.intake import pixel_array
from service.storage.records import TaskInfo, TaskWarning

MAX_PAGE_SIZE = 200
_LABEL = Field(min_length=1, max_length=200)


def _image(value: object) -> str | np.ndarray:
    """A base64 string stays as is (decoded later, off the event loop); pixel arrays are checked now."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"pixels"}:
        try:
            return pixel_array(value["pixels"])
        except InvalidImage as exc:
            raise PydanticCustomError("invalid_pixels", exc.message) from None
    raise PydanticCustomError(
        "invalid_image", 'an image is a base64 string or an object {"pixels": [[...], ...]}'
    )


Image = Annotated[
    Any,
    PlainValidator(_image),
    WithJsonSchema({
        "oneOf": [
            {"type": "string", "description": "base64 of an image file, optionally a data: URL"},
            {"type": "object", "required": ["pixels"], "additionalProperties": False,
             "properties": {"pixels": {
                 "type": "array", "minItems": 1, "items": {
                     "type": "array", "minItems": 1,
                     "items": {"type": "number", "minimum": 0, "maximum": 255}},
                 "description": "rows of grey levels, all of one length: all integers 0..255 or all "
                                "numbers in [0, 1]",
             }}},
        ]
    }),
]


class _Body(BaseModel):
    # Strict: "3" is not a top_k and "yes" is not a boolean; unknown fields are typos, not extras.
    model_config = ConfigDict(extra="forbid", strict=True)


class Example(_Body):
    label: Annotated[str, _LABEL]
    image: Annotated[Image, Field(description="the example's drawing; a blank image (a single shade "
                                              "throughout) is a 422 invalid_image")]


class TaskCreate(_Body):
    name: Annotated[str, Field(max_length=200)] | None = None
    examples: Annotated[list[Example], Field(min_length=1)]


class ExamplesAdd(_Body):
    examples: Annotated[list[Example], Field(min_length=1)]


class ClassifyRequest(_Body):
    images: Annotated[list[Image], Field(min_length=1)]
    top_k: Annotated[int, Field(ge=1)] = 1
    explain: bool = False
    min_confidence: Annotated[float, Field(
        ge=0, le=1, allow_inf_nan=False,
        description="a query whose best probability is below this gets `label: null` (none of the "
                    "task's labels; its `confidence` and `top_k` are still given); 0, the default, "
                    "labels every query",
    )] = 0.0


class ClassifyOnceRequest(ClassifyRequest):
    support: Annotated[list[Example], Field(min_length=1)]


class MisclassifiedDetails(BaseModel):
    example_index: int = Field(description="the example's index in the task's support order "
                                           "(all its examples, as `attention` counts them)")
    label: str = Field(description="the example's own label")
    predicted_label: str = Field(description="the label the task classifies the example as")
    confidence: float = Field(description="the probability of `predicted_label`")


class MisclassifiedExample(BaseModel):
    """A support example that its own task does not classify as its label."""

    type: Literal["misclassified_example"]
    message: str = Field(description="what is wrong, for a person")
    details: MisclassifiedDetails


class IndistinguishableDetails(BaseModel):
    example_indices: list[int] = Field(description="the two examples' indices in support order")
    labels: list[str] = Field(description="their labels, in the same order")
    cosine: float = Field(description="the cosine similarity of their representations")


class IndistinguishableExamples(BaseModel):
    """Two examples of different labels whose representations the model cannot tell apart
    (cosine similarity of 0.99 or more): queries like them get either label."""

    type: Literal["indistinguishable_examples"]
    message: str = Field(description="what is wrong, for a person")
    details: IndistinguishableDetails


RegistrationWarning = Annotated[MisclassifiedExample | IndistinguishableExamples, Field(discriminator="type")]


class TaskPublic(BaseModel):
    task_id: str
    name: str | None
    labels: list[str]
    n_way: int
    n_examples: int
    shots: dict[str, int]
    model_version: str
    created_at: datetime
    updated_at: datetime
    memory_bytes: int
    warnings: list[RegistrationWarning] = Field(
        description="what the model found wrong with the support set when it was last built (at "
                    "registration, on added examples, or on new weights); empty when all is well. "
                    "Advice, not an error: the task is registered either way",
    )

    @classmethod
    def of(cls, info: TaskInfo) -> TaskPublic:
        return cls(
            task_id=info.task_id, name=info.name, labels=info.labels, n_way=len(info.labels),
            n_examples=len(info.example_labels), shots=info.shots, model_version=info.model_version,
            created_at=info.created_at, updated_at=info.updated_at, memory_bytes=info.memory_bytes,
            warnings=[_WARNING.validate_python(_fields(w)) for w in info.warnings],
        )


def _fields(warning: TaskWarning) -> dict[str, Any]:
    return {"type": warning.type, "message": warning.message, "details": warning.details}


_WARNING: TypeAdapter[Any] = TypeAdapter(RegistrationWarning)


class TasksPublic(BaseModel):
    data: list[TaskPublic]
    next_cursor: str | None


class LabelProbability(BaseModel):
    label: str
    probability: float


class AttentionWeight(BaseModel):
    example_index: int
    label: str
    weight: float


class Prediction(BaseModel):
    label: str | None = Field(description="the most probable label; null when its probability is "
                                          "below the request's `min_confidence` (none of these)")
    confidence: float = Field(description="the most probable label's probability (calibrated)")
    support_similarity: float = Field(
        description="the query's best cosine similarity to the support set's representations, in "
                    "[-1, 1]: low for an image unlike every registered example, whatever its "
                    "probabilities",
    )
    top_k: list[LabelProbability]
    # Present only when the request asked to explain.
    attention: list[AttentionWeight] | None = Field(default=None, exclude_if=lambda v: v is None)


class ClassifyResponse(BaseModel):
    task_id: str | None = Field(default=None, exclude_if=lambda v: v is None)  # None: one-off episode
    model_version: str
    predictions: list[Prediction]


class ModelPublic(BaseModel):
    name: str
    version: str
    max_way: int
    max_examples: int
    image_size: int
    backend: str
    device: str


class Status(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    type: str = Field(description="snake_case error type; one status code per type")
    message: str = Field(description="what is wrong, for a person; names the field when there is one")
    details: dict[str, Any] | None = Field(description="field, index (of the example or image), ...")


class ErrorPublic(BaseModel):
    """The body of every error response."""

    error: ErrorDetail
