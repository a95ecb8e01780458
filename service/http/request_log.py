"""One log line per request, with an X-Request-ID that is echoed back on every response, errors
included.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError
from service.http.errors import error_response

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own id is kept when it is short and plain, so it cannot forge log lines or headers.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

access_log = logging.getLogger("service.access")


class RequestLogMiddleware:
    """Gives each request an id (the client's X-Request-ID if sane, else a fresh one), puts it on
    the response, and logs one line when the request ends: request_id, method, route template,
    status, latency_ms, task_id (when the path names one) and a prefix of the owner hash."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id(scope)
        status: int | None = None
        created: str | None = None  # a new task's id, from the Location of a 201

        async def send_with_id(message: Message) -> None:
            nonlocal status, created
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                if status == 201 and "location" in headers:
                    created = headers["location"].rpartition("/")[2]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Unexpected: answer in the contract's shape, with the id, before the server logs the
            # traceback (Starlette's outer error middleware re-raises after a started response).
            if status is None:
                await error_response(ServiceError("internal error"))(scope, receive, send_with_id)
            status = 500
            raise
        finally:
            _log_request(scope, request_id, status, time.perf_counter() - start, created)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _log_request(scope: Scope, request_id: str, status: int | None, seconds: float,
                 created: str | None) -> None:
    route = getattr(scope.get("route"), "path", "unmatched")
    fields: dict[str, Any] = {
        "request_id": request_id, "method": scope["method"], "route": route,
        "status": status if status is not None else 499,  # the client left before any answer
        "latency_ms": round(seconds * 1000, 2),
    }
    task_id = scope.get("path_params", {}).get("task_id", created)
    if task_id is not None:
        fields["task_id"] = str(task_id)[:64]
    owner = scope.get("state", {}).get("owner")
    if owner:
        fields["owner"] = owner[:8]  # enough to tell tenants apart in logs; not the key, not even its hash
    access_log.info("%s %s %s", scope["method"], route, fields["status"], extra=fields)
