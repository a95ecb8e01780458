"""Open Inference Protocol (KServe v2 / Triton HTTP) routes, each task served as a model named by
its task id: thin handlers over `TaskService`, tensors in service/http/v2_tensors.py.

Same keys and rate limits as /v1 (another key's task is a 404); errors are `{"error": "<message>"}`
with /v1's status codes. Not in the OpenAPI schema: the protocol documents itself.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.datastructures import Headers

from service.errors import NotFound, UnsupportedMediaType
from service.http.deps import OwnerDep, RuntimeDep, TasksDep, limit_rate
from service.http.limits import LimitedRoute
from service.http.tasks import TaskService
from service.http.v2_tensors import (
    BINARY_HEADER,
    IMAGE,
    LABEL,
    PIXELS,
    PROBABILITIES,
    SUPPORT_SIMILARITY,
    encode_infer_response,
    parse_infer_request,
)

EXTENSIONS = ["classification", "binary_tensor_data"]


class InferenceRoute(LimitedRoute):
    """Bodies within the limit as for /v1, but not only JSON: the binary extension appends raw
    tensor data, and Triton's clients send no Content-Type at all."""

    @staticmethod
    def check_content_type(headers: Headers) -> None:
        if headers.get("content-encoding", "identity").lower() != "identity":
            raise UnsupportedMediaType("compressed request bodies (Content-Encoding) are not supported")
        content_type = headers.get("content-type")
        if content_type is None or BINARY_HEADER.lower() in headers:
            return
        if content_type.split(";")[0].strip().lower() not in ("application/json", "application/octet-stream"):
            raise UnsupportedMediaType(
                f"send JSON, or JSON then binary tensor data with {BINARY_HEADER}; not {content_type}"
            )


async def model_version(request: Request, tasks: TasksDep) -> str:
    """The weights serving every task; /versions/{version} routes must name them."""
    served = tasks.engine.info.version
    asked = request.path_params.get("version")
    if asked is not None and asked != served:
        raise NotFound(f"no model version {asked!r}; the served version is {served!r}")
    return served


VersionDep = Annotated[str, Depends(model_version)]

v2 = APIRouter(prefix="/v2", include_in_schema=False)
models = APIRouter(prefix="/models", route_class=InferenceRoute, dependencies=[Depends(limit_rate)])
# Each model route also answers under /versions/{version}, as the protocol's clients may ask.
_MODEL = ("/{task_id}", "/{task_id}/versions/{version}")


@v2.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "metanet", "version": request.app.version, "extensions": EXTENSIONS}


@v2.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@v2.get("/health/ready")
async def ready(runtime: RuntimeDep) -> dict[str, bool]:
    await runtime.check_ready()  # 503 {"error": ...} until loaded: any non-200 means "not ready"
    return {"ready": True}


@models.get(_MODEL[0])
@models.get(_MODEL[1])
async def model_metadata(
    task_id: str, tasks: TasksDep, owner: OwnerDep, version: VersionDep
) -> dict[str, Any]:
    info = await tasks.get(owner, task_id)
    size = tasks.engine.info.image_size
    return {
        "name": task_id,
        "versions": [version],
        "platform": "metanet",
        "inputs": [  # a request sends exactly one of them
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "FP32", "shape": [-1, size, size]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(info.labels)]},
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
            {"name": SUPPORT_SIMILARITY, "datatype": "FP32", "shape": [-1]},
        ],
        # Column k of PROBABILITIES (index k of a classification) is labels[k].
        "parameters": {"labels": info.labels, "task_name": info.name},
    }


@models.get(f"{_MODEL[0]}/ready")
@models.get(f"{_MODEL[1]}/ready")
async def model_ready(task_id: str, tasks: TasksDep, owner: OwnerDep, version: VersionDep) -> dict[str, Any]:
    await tasks.get(owner, task_id)  # 404 when the task is not this key's
    return {"name": task_id, "ready": True}


@models.post(f"{_MODEL[0]}/infer")
@models.post(f"{_MODEL[1]}/infer")
async def infer(
    task_id: str, request: Request, tasks: TasksDep, owner: OwnerDep, version: VersionDep
) -> Response:
    inference = parse_infer_request(await request.body(), request.headers.get(BINARY_HEADER),
                                    tasks.engine.info.image_size)
    probs, labels, similarity = await _scores(tasks, owner, task_id, inference.images)
    body, headers = encode_infer_response(inference, task_id, version, probs, labels, similarity)
    return Response(body, headers=headers)


async def _scores(
    tasks: TaskService, owner: str, task_id: str, images: list[Any]
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(n_query, n_way) probabilities, column k for labels[k], the task's class order; and each
    query's support similarity (n_query,)."""
    predictions = await tasks.classify(owner, task_id, images, top_k=tasks.engine.info.max_way, explain=False)
    rows = [{p.label: p.probability for p in prediction.top_k} for prediction in predictions]
    # Read after classifying: examples added meanwhile only append labels, so the task's order
    # restricted to the labels the model scored is the order of the memory that scored them.
    labels = [label for label in (await tasks.get(owner, task_id)).labels if label in rows[0]]
    similarity = np.array([p.support_similarity for p in predictions], dtype=np.float32)
    return np.array([[row[label] for label in labels] for row in rows], dtype=np.float32), labels, similarity


v2.include_router(models)
