"""The error taxonomy: one status per type, field paths, and FastAPI's errors in our shape."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.errors import (
    BodyTooLarge,
    ImageTooLarge,
    InvalidImage,
    MalformedJSON,
    NotReady,
    Overloaded,
    RateLimited,
    ServiceError,
    TaskNotFound,
)
from service.http.errors import STATUS, _from_validation, field_path, status_of
from service.process.app import create_app
from service.settings import Settings


@pytest.mark.parametrize(("error", "status"), [
    (MalformedJSON("x"), 400), (TaskNotFound("t"), 404), (BodyTooLarge("x"), 413), (ImageTooLarge("x"), 413),
    (InvalidImage("x"), 422), (Overloaded("x"), 429), (NotReady("x"), 503), (ServiceError("x"), 500),
])
def test_every_error_type_has_its_status_from_the_one_table(error: ServiceError, status: int) -> None:
    assert status_of(error) == status


def test_every_error_class_has_a_distinct_type_string() -> None:
    def subclasses(cls: type) -> list[type]:
        return [cls] + [s for sub in cls.__subclasses__() for s in subclasses(sub)]

    classes = subclasses(ServiceError)
    assert len({c.type for c in classes}) == len(classes)
    assert set(STATUS) <= set(classes)


def test_located_error_names_field_and_index_in_message_and_details() -> None:
    body = InvalidImage("not valid base64").located("examples[3].image", 3).body()
    assert body == {"error": {"type": "invalid_image", "message": "examples[3].image: not valid base64",
                              "details": {"field": "examples[3].image", "index": 3}}}


@pytest.mark.parametrize(("loc", "path"), [
    (("body", "examples", 3, "image"), "examples[3].image"),
    (("query", "limit"), "limit"),
    (("body",), "body"),
    (("body", "images", 0), "images[0]"),
])
def test_field_paths_read_like_the_request(loc: tuple, path: str) -> None:
    assert field_path(loc) == path


def test_json_decode_errors_become_malformed_json() -> None:
    error = _from_validation([{"type": "json_invalid", "loc": ("body", 7), "msg": "JSON decode error",
                               "ctx": {"error": "Expecting value"}}])
    assert isinstance(error, MalformedJSON) and "position 7" in error.message


def test_validation_errors_name_the_first_field_and_example_index() -> None:
    error = _from_validation([
        {"type": "string_type", "loc": ("body", "examples", 2, "label"),
         "msg": "Input should be a valid string"},
        {"type": "missing", "loc": ("body", "name"), "msg": "Field required"},
    ])
    body = error.body()["error"]
    assert body["message"] == "examples[2].label: Input should be a valid string"
    assert body["details"]["index"] == 2 and len(body["details"]["errors"]) == 2


def test_rate_limited_and_overloaded_share_the_429_row() -> None:
    assert status_of(RateLimited("x")) == status_of(Overloaded("x")) == 429
    assert RateLimited("x").body()["error"]["type"] == "rate_limited"


def test_a_405_lists_every_method_served_at_that_path(tmp_path) -> None:
    """Starlette's own Allow names only the first route matching the path."""
    app = create_app(Settings(data_dir=tmp_path))

    async def allow(method: str, path: str) -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as client:
            response = await client.request(method, path)
        assert response.status_code == 405 and response.json()["error"]["type"] == "method_not_allowed"
        return response.headers["allow"]

    assert asyncio.run(allow("PUT", "/v1/tasks")) == "GET, HEAD, POST"
    assert asyncio.run(allow("POST", "/v1/tasks/abc")) == "DELETE, GET, HEAD"
    assert asyncio.run(allow("DELETE", "/metrics")) == "GET, HEAD"
