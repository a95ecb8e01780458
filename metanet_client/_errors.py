"""What the client raises: API error bodies as typed exceptions, plus its own local failures.

    MetaNetError
    ├── APIConnectionError          the service could not be reached (refused, DNS, reset, ...)
    │   └── APITimeoutError         ... or did not answer within the timeout
    ├── UnexpectedResponse          the service answered something that is not the contract
    ├── ImageError (ValueError)     an image given to the client cannot be read or encoded
    └── MetaNetAPIError             the service answered with the contract's error body
        ├── BadRequest              400 bad_request, malformed_json
        ├── Unauthorized            401 unauthorized
        ├── NotFound                404 not_found
        │   └── TaskNotFound        404 task_not_found
        ├── MethodNotAllowed        405 method_not_allowed
        ├── PayloadTooLarge         413 payload_too_large, body_too_large, image_too_large
        ├── UnsupportedMediaType    415 unsupported_media_type
        ├── InvalidInput            422 invalid_input
        │   └── InvalidImage        422 invalid_image
        ├── TooManyRequests         429 too_many_requests     (retry_after)
        │   ├── Overloaded          429 overloaded            (the model's queue is full)
        │   └── RateLimited         429 rate_limited          (this key's request budget is spent)
        ├── InternalError           500 internal_error
        └── NotReady                503 not_ready             (retry_after)

An error type the client does not know maps by its status code, so a newer server's types still
land in the right branch; `.type` always holds the type the server sent.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx


class MetaNetError(Exception):
    """Base of everything the client raises on purpose."""


class APIConnectionError(MetaNetError):
    """The request did not get an answer: nothing listening, DNS failure, connection reset, ..."""


class APITimeoutError(APIConnectionError):
    """The service did not answer within the client's timeout."""


class UnexpectedResponse(MetaNetError):
    """A response outside the contract: not JSON, or JSON of the wrong shape."""


class ImageError(MetaNetError, ValueError):
    """An image cannot be read from disk or encoded into one of the contract's image values."""


class MetaNetAPIError(MetaNetError):
    """An error response: `status` (HTTP), `type` (the contract's snake_case type), `message` (for a
    person), `details` (optional, e.g. the offending field and index) and `retry_after` (seconds,
    from the `Retry-After` header of 429 and 503 answers)."""

    type = "error"

    def __init__(
        self, message: str, *, status: int, type: str | None = None,
        details: Any = None, retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or self.type
        self.details = details
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, type={self.type!r}, message={self.message!r})"


class BadRequest(MetaNetAPIError):
    type = "bad_request"


class Unauthorized(MetaNetAPIError):
    type = "unauthorized"


class NotFound(MetaNetAPIError):
    type = "not_found"


class TaskNotFound(NotFound):
    type = "task_not_found"


class MethodNotAllowed(MetaNetAPIError):
    type = "method_not_allowed"


class PayloadTooLarge(MetaNetAPIError):
    type = "payload_too_large"


class UnsupportedMediaType(MetaNetAPIError):
    type = "unsupported_media_type"


class InvalidInput(MetaNetAPIError):
    type = "invalid_input"


class InvalidImage(InvalidInput):
    type = "invalid_image"


class TooManyRequests(MetaNetAPIError):
    type = "too_many_requests"


class Overloaded(TooManyRequests):
    type = "overloaded"


class RateLimited(TooManyRequests):
    type = "rate_limited"


class InternalError(MetaNetAPIError):
    type = "internal_error"


class NotReady(MetaNetAPIError):
    type = "not_ready"


_BY_TYPE: dict[str, type[MetaNetAPIError]] = {
    "malformed_json": BadRequest,
    "body_too_large": PayloadTooLarge,
    "image_too_large": PayloadTooLarge,
    **{cls.type: cls for cls in (
        BadRequest, Unauthorized, NotFound, TaskNotFound, MethodNotAllowed, PayloadTooLarge,
        UnsupportedMediaType, InvalidInput, InvalidImage, TooManyRequests, Overloaded, RateLimited,
        InternalError, NotReady,
    )},
}
_BY_STATUS: dict[int, type[MetaNetAPIError]] = {
    400: BadRequest, 401: Unauthorized, 404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 422: InvalidInput, 429: TooManyRequests, 500: InternalError, 503: NotReady,
}


def error_from_response(response: httpx.Response) -> MetaNetAPIError:
    """The exception for an error response, in the contract's shape or not (a proxy's HTML page)."""
    status = response.status_code
    try:
        error = response.json()["error"]
        error_type, message, details = str(error["type"]), str(error["message"]), error.get("details")
    except (ValueError, KeyError, TypeError):
        fallback = _BY_STATUS.get(status, MetaNetAPIError)
        error_type, details = fallback.type, None
        message = f"HTTP {status} {response.reason_phrase}: {response.text[:200]}".rstrip(": ")
    cls = _BY_TYPE.get(error_type) or _BY_STATUS.get(status) or (
        InternalError if status >= 500 else MetaNetAPIError)
    return cls(message, status=status, type=error_type, details=details,
               retry_after=retry_after(response.headers.get("retry-after")))


def retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds: either delta-seconds or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
