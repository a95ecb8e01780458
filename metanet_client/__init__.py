"""Python client for the MetaNet few-shot classification service (HTTP contract v1, docs/api.md).

Needs only httpx and Pillow:

    with MetaNetClient("http://127.0.0.1:8000", api_key=None) as client:
        task = client.create_task({"alpha": ["a1.png", "a2.png"], "beta": ["b1.png"]}, name="demo")
        result = client.classify(task.task_id, ["query.png"], top_k=2, min_confidence=0.5)
        print(result[0].label, result[0].confidence)  # label None: below min_confidence
"""

from metanet_client._client import DEFAULT_TIMEOUT, DEFAULT_URL, AsyncMetaNetClient, MetaNetClient
from metanet_client._errors import (
    APIConnectionError,
    APITimeoutError,
    BadRequest,
    ImageError,
    InternalError,
    InvalidImage,
    InvalidInput,
    MetaNetAPIError,
    MetaNetError,
    MethodNotAllowed,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    TaskNotFound,
    TooManyRequests,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
)
from metanet_client._images import EncodedImage, Example, ImageInput, encode_image
from metanet_client._types import (
    AttentionWeight,
    ClassifyResult,
    LabelProbability,
    ModelInfo,
    Prediction,
    RegistrationWarning,
    Task,
    TaskPage,
)

__all__ = [
    "DEFAULT_TIMEOUT", "DEFAULT_URL", "AsyncMetaNetClient", "MetaNetClient",
    "APIConnectionError", "APITimeoutError", "BadRequest", "ImageError", "InternalError", "InvalidImage",
    "InvalidInput", "MetaNetAPIError", "MetaNetError", "MethodNotAllowed", "NotFound", "NotReady",
    "Overloaded", "PayloadTooLarge", "RateLimited", "TaskNotFound", "TooManyRequests", "Unauthorized",
    "UnexpectedResponse", "UnsupportedMediaType",
    "EncodedImage", "Example", "ImageInput", "encode_image",
    "AttentionWeight", "ClassifyResult", "LabelProbability", "ModelInfo", "Prediction", "RegistrationWarning",
    "Task", "TaskPage",
]
