"""Dependencies of the route handlers, as `Annotated` aliases.

The dependency functions are `async def` although none awaits: FastAPI runs a plain `def`
dependency in its thread pool, a thread hop per dependency per request. Each takes the request
itself, not another dependency: FastAPI solves a dependency's own dependencies again on every
request, event-loop time that the classify routes feel (docs/performance.md, "The HTTP layer's
cost per request"). `runtime_of` and `owner_of` are their plain versions for code outside
dependency injection."""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, get_type_hints

from fastapi import Depends, Request, params
from fastapi.datastructures import DefaultPlaceholder
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.errors import InvalidInput, NotReady, RateLimited, Unauthorized
from service.http.errors import unparsable_json
from service.http.limits import LimitedRoute
from service.http.tasks import TaskService
from service.http.tenants import KeyRing, RateLimiter, retry_after
from service.inference.engine import Call
from service.settings import Settings

TIMEOUT_HEADER = "X-Request-Timeout-Ms"


class Runtime(Protocol):
    """What the routes need of the process's live parts (service.process.runtime.Runtime, found
    at `request.app.state.runtime`)."""

    settings: Settings
    keys: KeyRing  # of /v1's tenants
    metrics_keys: KeyRing
    limiter: RateLimiter
    tasks: TaskService | None  # None until the model is loaded and warm
    failure: str | None  # why startup failed, if it did

    async def check_ready(self) -> None: ...  # NotReady, saying why
    async def render_metrics(self) -> bytes: ...


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_tasks(request: Request) -> TaskService:
    runtime = runtime_of(request)
    if runtime.tasks is None:
        raise NotReady(runtime.failure or "the model is still loading; retry shortly",
                       headers={"Retry-After": "5"})
    return runtime.tasks


TasksDep = Annotated[TaskService, Depends(get_tasks)]


async def get_call(request: Request) -> Call:
    """The model job's deadline, and a way for the batcher to see that the client has gone.

    A client may shorten the server's request_timeout_s with the header X-Request-Timeout-Ms.
    (Read here rather than declared as an OpenAPI parameter: a fuzzer sending 1e-300 ms would
    rightly get 504s, which it would count as server errors.)"""
    timeout = runtime_of(request).settings.request_timeout_s
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            ms = float(header)
        except ValueError:
            ms = math.nan
        if not 0 < ms <= 3_600_000:
            raise InvalidInput(f"{TIMEOUT_HEADER} must be a number of milliseconds in (0, 3600000], "
                               f"got {header[:40]!r}", field=TIMEOUT_HEADER)
        timeout = min(timeout, ms / 1000)
    return Call(time.monotonic() + timeout, request.is_disconnected)


CallDep = Annotated[Call, Depends(get_call)]


def owner_of(request: Request, runtime: Runtime) -> str:
    """Who is asking: '' when no API keys are configured, else the owner (a hash) of the caller's
    key. The request log shows a prefix of it; the key itself is never kept."""
    if not runtime.keys:
        return ""
    known = getattr(request.state, "owner", None)  # checked already for this request (the scope's)
    if known is not None:
        return known
    owner = runtime.keys.owner(request.headers.get("authorization"))
    if owner is None:
        raise Unauthorized("send a valid API key as Authorization: Bearer <key>", headers=_CHALLENGE)
    request.state.owner = owner
    return owner


async def get_owner(request: Request) -> str:
    return owner_of(request, runtime_of(request))


OwnerDep = Annotated[str, Depends(get_owner)]


async def limit_rate(request: Request, runtime: RuntimeDep, owner: OwnerDep) -> None:
    """As a dependency: spend one token of the caller's bucket (routes not admitted by AdmittedRoute)."""
    spend_token(request, runtime, owner)


def spend_token(request: Request, runtime: Runtime, owner: str) -> None:
    """Spend one token of the caller's bucket (its key's, or its address's without keys), or 429."""
    client = owner or (request.client.host if request.client else "")
    wait = runtime.limiter.take(client)
    if wait > 0:
        raise RateLimited(f"too many requests; this client may retry in {wait:.1f} s",
                          headers={"Retry-After": retry_after(wait)})


class AdmittedRoute(LimitedRoute):
    """A /v1 route that checks the caller (401) and spends a token of its bucket (429) before
    anything else, its body included: a stranger cannot make the server read a body, and a
    client over its rate cannot dodge the limit with requests refused later (413, 415, 422).
    Classify routes also refuse (429) here while the model's queue is full."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        runtime = runtime_of(request)
        spend_token(request, runtime, owner_of(request, runtime))
        if self.path.endswith("/classify") and runtime.tasks is not None:
            # The model's queue is full for a request of any size: 429 before the body is read or
            # decoded, so a crowd of clients retrying at once costs the server little.
            runtime.tasks.engine.check_admission(runtime.tasks.max_images)
        await super().handle(scope, receive, send)


async def require_metrics_key(request: Request, runtime: RuntimeDep) -> None:
    """/metrics takes an operator's key when METANET_METRICS_KEYS is set; else it is open."""
    if runtime.metrics_keys and runtime.metrics_keys.owner(request.headers.get("authorization")) is None:
        raise Unauthorized("send a metrics key as Authorization: Bearer <key>", headers=_CHALLENGE)


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class LeanRoute(AdmittedRoute):
    """An AdmittedRoute served without FastAPI's per-request dependency solving and response
    validation, when its endpoint's parameters allow: strings from the path, one JSON body (a
    pydantic model) and dependencies that each take only the request (the ones above), and it
    returns a pydantic model. The body is parsed and validated as FastAPI would (the same errors,
    located under "body"), each dependency is called once, and the returned model is written as
    JSON. Other endpoints get FastAPI's handler. The OpenAPI document still comes from the
    endpoint's signature.

    Why: on the classify routes FastAPI's handler (dependency solving, validating the returned
    model again) is a large share of the event loop's time per one-image request, time the model
    threads wait for under load (docs/performance.md, "The HTTP layer's cost per request")."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        fastapis = super().get_route_handler()
        plan = _lean_plan(self.endpoint, self.path) if self._plain_declaration() else None
        if plan is None:
            return fastapis
        endpoint, status_code = self.endpoint, self.status_code or 200

        async def handler(request: Request) -> Response:
            if request.app.dependency_overrides:  # tests' substitutes: FastAPI resolves them
                return await fastapis(request)
            # FastAPI's order: bad JSON first, then the dependencies (401, 503, a bad header),
            # then the parameters' and body's validation.
            document = await _json_document(request) if plan.body is not None else None
            values: dict[str, Any] = {name: request.path_params[name] for name in plan.path}
            for name, dependency in plan.dependencies:
                values[name] = await dependency(request)
            if plan.body is not None:
                values[plan.body[0]] = _validated_body(document, plan.body[1])
            result = await endpoint(**values)
            return Response(result.model_dump_json(), status_code=status_code, media_type="application/json")

        return handler

    def _plain_declaration(self) -> bool:
        """Declared without what the lean handler does not do: route or router dependencies, a
        response model other than the returned type, a response class, serialisation options."""
        return (not self.dependencies and isinstance(self.response_class, DefaultPlaceholder)
                and self.response_model_include is None and self.response_model_exclude is None
                and self.response_model_by_alias and not self.response_model_exclude_unset
                and not self.response_model_exclude_defaults and not self.response_model_exclude_none
                and self.response_model is get_type_hints(self.endpoint).get("return"))


@dataclass(frozen=True)
class _LeanPlan:
    path: tuple[str, ...]
    body: tuple[str, TypeAdapter[Any]] | None
    dependencies: tuple[tuple[str, Callable[[Request], Awaitable[Any]]], ...]


def _lean_plan(endpoint: Callable[..., Any], path: str) -> _LeanPlan | None:
    """How to call `endpoint` without FastAPI's dependency solving, or None if it needs it."""
    if not inspect.iscoroutinefunction(endpoint):
        return None
    hints = get_type_hints(endpoint, include_extras=True)
    if not isinstance(hints.get("return"), type) or not issubclass(hints["return"], BaseModel):
        return None
    path_names, body, dependencies = [], None, []
    for name, parameter in inspect.signature(endpoint).parameters.items():
        hint = hints.get(name)
        depends = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, params.Depends)]
        if depends and depends[0].dependency is not None and _takes_request_only(depends[0].dependency):
            dependencies.append((name, depends[0].dependency))
        elif hint is str and f"{{{name}}}" in path and parameter.default is inspect.Parameter.empty:
            path_names.append(name)
        elif isinstance(hint, type) and issubclass(hint, BaseModel) and body is None:
            body = (name, TypeAdapter(hint))
        else:
            return None
    return _LeanPlan(tuple(path_names), body, tuple(dependencies))


def _takes_request_only(dependency: Callable[..., Any]) -> bool:
    if not inspect.iscoroutinefunction(dependency):
        return False
    parameters = list(inspect.signature(dependency).parameters.values())
    return len(parameters) == 1 and get_type_hints(dependency).get(parameters[0].name) is Request


_NO_BODY = object()


async def _json_document(request: Request) -> Any:
    """The request's body parsed as JSON (_NO_BODY when empty), or FastAPI's error for bad JSON."""
    raw = await request.body()
    if not raw:
        return _NO_BODY
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos),
                                       "msg": "JSON decode error", "input": {},
                                       "ctx": {"error": exc.msg}}]) from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, too deep, an integer too long
        raise unparsable_json(exc) from None


def _validated_body(document: Any, adapter: TypeAdapter[Any]) -> Any:
    """A JSON body parameter validated as FastAPI does, its errors located under "body"."""
    if document is _NO_BODY:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                       "input": None}])
    try:
        return adapter.validate_python(document, from_attributes=True)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])}
                                      for error in exc.errors(include_url=False)]) from None
