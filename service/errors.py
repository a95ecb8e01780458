"""The errors a client can see, one class per kind, raised by every part of the service.

    ServiceError                      internal_error
    ├── BadRequest                    bad_request
    │   └── MalformedJSON             malformed_json
    ├── Unauthorized                  unauthorized
    ├── NotFound                      not_found
    │   └── TaskNotFound              task_not_found
    ├── MethodNotAllowed              method_not_allowed
    ├── PayloadTooLarge               payload_too_large
    │   ├── BodyTooLarge              body_too_large
    │   └── ImageTooLarge             image_too_large
    ├── UnsupportedMediaType          unsupported_media_type
    ├── InvalidInput                  invalid_input
    │   └── InvalidImage              invalid_image
    ├── TooManyRequests               too_many_requests (Retry-After)
    │   ├── Overloaded                overloaded        (the model's queue is full)
    │   └── RateLimited               rate_limited      (this key's token bucket is empty)
    ├── ClientDisconnected            client_disconnected (nobody reads it: logs and metrics)
    ├── NotReady                      not_ready
    └── DeadlineExceeded              deadline_exceeded (the request's deadline passed first)

Code raises these and builds no response; service/http/errors.py holds the one table from type to
status code and the one handler that answers with `{"error": {"type", "message", "details"}}`.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service answers with. `field`/`index` locate bad input."""

    type = "internal_error"

    def __init__(
        self, message: str, *, field: str | None = None, index: int | None = None,
        details: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.index = index
        self.details = details
        self.headers = headers or {}

    def located(self, field: str, index: int | None = None) -> ServiceError:
        """This error, pinned to a place in the request (when the raiser did not know it)."""
        self.field, self.index = field, index
        return self

    def body(self) -> dict[str, Any]:
        message = f"{self.field}: {self.message}" if self.field else self.message
        details = dict(self.details or {})
        if self.field is not None:
            details["field"] = self.field
        if self.index is not None:
            details["index"] = self.index
        return {"error": {"type": self.type, "message": message, "details": details or None}}


class BadRequest(ServiceError):
    type = "bad_request"


class MalformedJSON(BadRequest):
    type = "malformed_json"


class Unauthorized(ServiceError):
    type = "unauthorized"


class NotFound(ServiceError):
    type = "not_found"


class TaskNotFound(NotFound):
    type = "task_not_found"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task {task_id!r}", details={"task_id": task_id})


class MethodNotAllowed(ServiceError):
    type = "method_not_allowed"


class PayloadTooLarge(ServiceError):
    type = "payload_too_large"


class BodyTooLarge(PayloadTooLarge):
    type = "body_too_large"


class ImageTooLarge(PayloadTooLarge):
    type = "image_too_large"


class UnsupportedMediaType(ServiceError):
    type = "unsupported_media_type"


class InvalidInput(ServiceError):
    type = "invalid_input"


class InvalidImage(InvalidInput):
    type = "invalid_image"


class TooManyRequests(ServiceError):
    type = "too_many_requests"


class Overloaded(TooManyRequests):
    type = "overloaded"


class RateLimited(TooManyRequests):
    type = "rate_limited"


class ClientDisconnected(ServiceError):
    """The client went away while its work was queued; the work was dropped before compute."""

    type = "client_disconnected"


class NotReady(ServiceError):
    type = "not_ready"


class DeadlineExceeded(ServiceError):
    """The request's deadline (X-Request-Timeout-Ms, or the configured request_timeout_s) passed
    before the model answered; queued work is dropped, not computed."""

    type = "deadline_exceeded"
