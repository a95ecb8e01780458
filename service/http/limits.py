"""Request-envelope checks before any parsing: body size (413) and content type (415).

The body is read here, counting bytes as they arrive, and handed on in one piece: a lying or
missing Content-Length cannot get more than `max_body_bytes` into memory.
"""

from __future__ import annotations

from email.message import Message as MimeHeader

from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from service.errors import BodyTooLarge, UnsupportedMediaType

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class LimitedRoute(APIRoute):
    """An APIRoute that first reads its body within the limit (413) and checks it is JSON (415).

    Checking here rather than in an outer middleware means the route is known (metrics label it)
    and the errors take the app's one exception handler like any other.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in _BODY_METHODS:
            limit = scope["app"].state.runtime.settings.max_body_bytes
            headers = Headers(scope=scope)
            body = await _read_body(headers, receive, limit)
            if body:
                self.check_content_type(headers)
            receive = _replay(body, receive)
        await super().handle(scope, receive, send)

    @staticmethod
    def check_content_type(headers: Headers) -> None:
        """415 unless the body is JSON; routes of other protocols override this."""
        _check_json(headers.get("content-type"))


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as ASGI expects

    return replay


async def _read_body(headers: Headers, receive: Receive, limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body is {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    while True:  # counts what arrives: a missing or lying Content-Length gets no further
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


# What clients send nearly always: accepted without parsing the header.
_PLAIN_JSON = frozenset({"application/json", "application/json; charset=utf-8"})


def _check_json(content_type: str | None) -> None:
    if content_type is not None and content_type.lower() in _PLAIN_JSON:
        return
    if content_type is None:
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    header = MimeHeader()
    header["content-type"] = content_type
    subtype = header.get_content_subtype()
    if header.get_content_maintype() != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise UnsupportedMediaType(
            f"the body must be JSON (Content-Type: application/json), not {content_type}"
        )
