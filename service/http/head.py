"""HEAD wherever GET is allowed: a HEAD request runs as the GET of its path and is answered with
that GET's status and headers, without the body.

FastAPI registers GET routes for GET alone; answering HEAD here keeps them (and the OpenAPI schema)
as declared.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}  # the server keeps its own scope: it knows it is HEAD

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(as_get, receive, without_body)
        finally:
            # What routing found (the route, its path parameters) for the log line and the metrics.
            scope.update({key: value for key, value in as_get.items() if key != "method"})
