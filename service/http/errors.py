"""How an error reaches the client: one status table, one JSON shape, one handler.

    ServiceError 500, BadRequest 400, Unauthorized 401, NotFound 404, MethodNotAllowed 405,
    PayloadTooLarge 413, UnsupportedMediaType 415, InvalidInput 422, TooManyRequests 429,
    ClientDisconnected 499, NotReady 503, DeadlineExceeded 504 (subclasses take their parent's)

`handle_error` (registered for every exception) turns any error of service/errors.py, and FastAPI's
and Starlette's own, into `{"error": {"type", "message", "details"}}`; under /v2 (the Open Inference
Protocol) into that protocol's `{"error": "<message>"}`, with the same status codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match

from service.errors import (
    BadRequest,
    ClientDisconnected,
    DeadlineExceeded,
    InvalidImage,
    InvalidInput,
    MalformedJSON,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServiceError,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)

# The one table from error class to status code; subclasses inherit their parent's row.
STATUS: dict[type[ServiceError], int] = {
    ServiceError: 500,
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    MethodNotAllowed: 405,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    TooManyRequests: 429,
    ClientDisconnected: 499,
    NotReady: 503,
    DeadlineExceeded: 504,
}


def status_of(error: ServiceError) -> int:
    return next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)


def error_response(error: ServiceError, *, v2: bool = False) -> JSONResponse:
    body = error.body()
    if v2:  # the Open Inference Protocol's error shape
        body = {"error": body["error"]["message"]}
    return JSONResponse(body, status_code=status_of(error), headers=error.headers)


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: whatever was raised, answer in the contract's shape.

    An unexpected exception is not logged here: Starlette re-raises it after this answer, and the
    server logs it with its traceback.
    """
    error = as_service_error(exc)
    if isinstance(error, MethodNotAllowed):
        # Starlette's Allow lists the methods of the first route matching the path only.
        error.headers["Allow"] = allowed_methods(request)
    path = request.url.path
    return error_response(error, v2=path == "/v2" or path.startswith("/v2/"))


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this request's path (the Allow header of a 405)."""
    methods: set[str] = set()
    routes = list(request.app.router.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # FastAPI wraps included routers
        if included is not None:
            routes += included.routes
        elif route.matches(request.scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods:
        methods.add("HEAD")  # service/http/head.py
    return ", ".join(sorted(methods))


def unparsable_json(cause: ValueError | RecursionError) -> MalformedJSON:
    """The 400 for a body that json.loads refused for other than its syntax: bytes that are not
    UTF-8 (or UTF-16/32) text, nesting too deep for the parser, an integer of more digits than
    Python converts."""
    if isinstance(cause, UnicodeDecodeError):
        return MalformedJSON(f"the body is not valid JSON (not {cause.encoding} text: {cause.reason} "
                             f"at byte {cause.start})")
    if isinstance(cause, RecursionError):
        return MalformedJSON("the body is not valid JSON for this service (nested too deeply)")
    return MalformedJSON(f"the body is not valid JSON for this service ({str(cause)[:200]})")


def as_service_error(exc: Exception) -> ServiceError:
    match exc:
        case ServiceError():
            return exc
        case RequestValidationError():
            return _from_validation(exc.errors())
        case HTTPException(status_code=404):
            return NotFound("no such route")
        case HTTPException(status_code=405):
            return MethodNotAllowed("method not allowed on this route", headers=dict(exc.headers or {}))
        case HTTPException(status_code=400) if isinstance(exc.__cause__, ValueError | RecursionError):
            # FastAPI's handler: a body json.loads refused other than by a syntax error
            return unparsable_json(exc.__cause__)
        case HTTPException(status_code=code) if 400 <= code < 500:
            return BadRequest(str(exc.detail))
        case _:
            return ServiceError("internal error")


def _from_validation(errors: Sequence[Any]) -> ServiceError:
    """FastAPI's validation errors as ours: 400 for bad JSON, else 422 naming the first field."""
    for e in errors:
        if e["type"] == "json_invalid":
            reason = e.get("ctx", {}).get("error", "JSON decode error")
            return MalformedJSON(f"the body is not valid JSON ({reason} at position {e['loc'][-1]})")
    listed = [
        {"field": field_path(e["loc"]), "message": _message(e), "type": e["type"]} for e in errors
    ]
    first = listed[0]
    kind = InvalidImage if first["type"] in ("invalid_image", "invalid_pixels") else InvalidInput
    return kind(
        first["message"], field=first["field"], index=example_index(errors[0]["loc"]),
        details={"errors": listed} if len(listed) > 1 else None,
    )


def field_path(loc: Sequence[str | int]) -> str:
    """("body", "examples", 3, "image") -> "examples[3].image"; the request part is dropped."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def example_index(loc: Sequence[str | int]) -> int | None:
    """The position in the first list the location goes through (examples, images, support)."""
    return next((part for part in loc if isinstance(part, int)), None)


def _message(error: dict[str, Any]) -> str:
    msg = str(error["msg"])
    # Pydantic prefixes messages from plain ValueErrors; the client only needs the reason.
    return msg.removeprefix("Value error, ")
