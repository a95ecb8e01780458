"""Error responses become typed exceptions carrying the API's status, type, message and details."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from metanet_client import (
    BadRequest,
    InternalError,
    InvalidImage,
    InvalidInput,
    MetaNetAPIError,
    MetaNetError,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    TaskNotFound,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)
from metanet_client._errors import error_from_response, retry_after


def error(status: int, error_type: str, message: str = "what went wrong", details: object = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"type": error_type, "message": message, "details": details}}
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(("status", "error_type", "cls"), [
    (400, "malformed_json", BadRequest), (400, "bad_request", BadRequest),
    (401, "unauthorized", Unauthorized), (404, "not_found", NotFound), (404, "task_not_found", TaskNotFound),
    (413, "body_too_large", PayloadTooLarge), (413, "image_too_large", PayloadTooLarge),
    (415, "unsupported_media_type", UnsupportedMediaType), (422, "invalid_input", InvalidInput),
    (422, "invalid_image", InvalidImage), (429, "overloaded", Overloaded), (429, "rate_limited", RateLimited),
    (429, "too_many_requests", TooManyRequests), (500, "internal_error", InternalError),
    (503, "not_ready", NotReady),
])
def test_every_error_type_of_the_contract_maps_to_its_exception(status: int, error_type: str,
                                                                cls: type) -> None:
    exc = error_from_response(error(status, error_type))
    assert type(exc) is cls
    assert (exc.status, exc.type, exc.message) == (status, error_type, "what went wrong")
    assert isinstance(exc, MetaNetAPIError) and isinstance(exc, MetaNetError)


def test_the_hierarchy_lets_callers_catch_a_family() -> None:
    assert issubclass(TaskNotFound, NotFound) and issubclass(InvalidImage, InvalidInput)
    assert issubclass(Overloaded, TooManyRequests) and issubclass(RateLimited, TooManyRequests)


def test_an_unknown_type_maps_by_status_and_keeps_the_type_sent() -> None:
    exc = error_from_response(error(422, "label_too_long"))
    assert type(exc) is InvalidInput and exc.type == "label_too_long"
    assert type(error_from_response(error(502, "bad_gateway"))) is InternalError
    assert type(error_from_response(error(418, "teapot"))) is MetaNetAPIError


def test_details_are_kept_and_str_shows_type_and_message() -> None:
    details = {"field": "examples[3].image", "index": 3}
    exc = error_from_response(error(422, "invalid_image", "examples[3].image: not an image", details))
    assert exc.details == details
    assert str(exc) == "invalid_image: examples[3].image: not an image"
    assert "InvalidImage(status=422" in repr(exc)


def test_a_body_outside_the_contract_still_gives_the_status_class() -> None:
    exc = error_from_response(httpx.Response(502, text="<html>Bad gateway</html>"))
    assert type(exc) is InternalError and exc.status == 502
    assert "502" in exc.message and "Bad gateway" in exc.message
    exc = error_from_response(httpx.Response(404, json={"detail": "Not Found"}))
    assert type(exc) is NotFound and exc.type == "not_found"


def test_retry_after_seconds_are_read_from_the_header() -> None:
    exc = error_from_response(error(429, "overloaded", headers={"Retry-After": "3"}))
    assert exc.retry_after == 3.0
    assert error_from_response(error(404, "task_not_found")).retry_after is None


def test_retry_after_accepts_an_http_date_and_ignores_garbage() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after(later) <= 31
    assert retry_after("soon") is None
    assert retry_after("-1") is None
