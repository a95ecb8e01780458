"""HTTP routes of the contract (docs/api.md): thin handlers over `TaskService`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import Response as RawResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.http.deps import CallDep, LeanRoute, OwnerDep, RuntimeDep, TasksDep, require_metrics_key
from service.http.schemas import (
    MAX_PAGE_SIZE,
    ClassifyOnceRequest,
    ClassifyRequest,
    ClassifyResponse,
    ErrorPublic,
    ExamplesAdd,
    ModelPublic,
    Status,
    TaskCreate,
    TaskPublic,
    TasksPublic,
)

_ERRORS = {
    400: "Malformed JSON", 401: "Missing or unknown API key", 404: "No such task (or not this key's)",
    413: "Body or image too large", 415: "Body not sent as JSON", 422: "Invalid content",
    429: "Rate limited, or the model's queue is full", 503: "Not ready (loading)",
    504: "The request's deadline passed before the model answered",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait", "required": True,
                          "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error responses a route can give, all in the one error shape."""
    return {code: {"model": ErrorPublic, "description": _ERRORS[code],
                   **({"headers": _HEADERS[code]} if code in _HEADERS else {})} for code in codes}


_BODY = errors(400, 413, 415)  # routes that take a JSON body
_TASK = errors(404)  # routes that name a task
_MODEL = errors(504)  # routes that queue model work under the request's deadline

v1 = APIRouter(prefix="/v1", route_class=LeanRoute, responses=errors(401, 422, 429, 503))
probes = APIRouter()


@v1.post("/tasks", status_code=status.HTTP_201_CREATED, responses={**_BODY, **_MODEL, 201: {"headers": {
    "Location": {"description": "the new task", "required": True, "schema": {"type": "string"}}}}})
async def register_task(
    body: TaskCreate, tasks: TasksDep, owner: OwnerDep, call: CallDep, response: Response
) -> TaskPublic:
    info = await tasks.register(owner, body.name, body.examples, call)
    response.headers["Location"] = f"/v1/tasks/{info.task_id}"
    return TaskPublic.of(info)


@v1.get("/tasks")
async def list_tasks(
    tasks: TasksDep, owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
    cursor: str | None = None,
) -> TasksPublic:
    page = await tasks.page(owner, limit, cursor)
    return TasksPublic(data=[TaskPublic.of(info) for info in page.tasks], next_cursor=page.next_cursor)


@v1.get("/tasks/{task_id}", responses=_TASK)
async def get_task(task_id: str, tasks: TasksDep, owner: OwnerDep) -> TaskPublic:
    return TaskPublic.of(await tasks.get(owner, task_id))


@v1.delete("/tasks/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_TASK)
async def delete_task(task_id: str, tasks: TasksDep, owner: OwnerDep) -> None:
    await tasks.delete(owner, task_id)


@v1.post("/tasks/{task_id}/examples", responses={**_BODY, **_TASK})
async def add_examples(task_id: str, body: ExamplesAdd, tasks: TasksDep, owner: OwnerDep) -> TaskPublic:
    return TaskPublic.of(await tasks.add_examples(owner, task_id, body.examples))


@v1.post("/tasks/{task_id}/classify", responses={**_BODY, **_TASK, **_MODEL})
async def classify(
    task_id: str, body: ClassifyRequest, tasks: TasksDep, owner: OwnerDep, call: CallDep
) -> ClassifyResponse:
    predictions = await tasks.classify(owner, task_id, body.images, body.top_k, body.explain, call,
                                       body.min_confidence)
    return ClassifyResponse(task_id=task_id, model_version=tasks.engine.info.version,
                            predictions=predictions)


@v1.post("/classify", responses={**_BODY, **_MODEL})
async def classify_once(body: ClassifyOnceRequest, tasks: TasksDep, call: CallDep) -> ClassifyResponse:
    predictions = await tasks.classify_once(body.support, body.images, body.top_k, body.explain, call,
                                            body.min_confidence)
    return ClassifyResponse(model_version=tasks.engine.info.version, predictions=predictions)


@v1.get("/model")
async def model_info(tasks: TasksDep) -> ModelPublic:
    info = tasks.engine.info
    return ModelPublic(name=info.name, version=info.version, max_way=info.max_way,
                       max_examples=tasks.max_examples, image_size=info.image_size,
                       backend=info.backend, device=info.device)


@probes.get("/healthz")
async def healthz() -> Status:
    return Status(status="alive")


@probes.get("/readyz", responses=errors(503))
async def readyz(runtime: RuntimeDep) -> Status:
    await runtime.check_ready()
    return Status(status="ready")


@probes.get("/metrics", response_class=RawResponse, dependencies=[Depends(require_metrics_key)], responses={
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
    **errors(401),
})
async def metrics(runtime: RuntimeDep) -> RawResponse:
    return RawResponse(await runtime.render_metrics(), media_type=CONTENT_TYPE_LATEST)
