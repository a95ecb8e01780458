"""The JSON content-type rule of request bodies (415 otherwise), on its fast path and off it."""

from __future__ import annotations

import pytest

from service.errors import UnsupportedMediaType
from service.http.limits import _check_json


@pytest.mark.parametrize("content_type", [
    "application/json",  # the fast path
    "application/json; charset=utf-8",
    "Application/JSON; Charset=UTF-8",
    "application/json;charset=utf-8",  # the parser
    "application/json; charset=latin-1",
    "application/problem+json",
    "APPLICATION/VND.API+JSON; version=2",
])
def test_json_bodies_pass(content_type: str) -> None:
    _check_json(content_type)


@pytest.mark.parametrize("content_type", [
    None, "", "text/plain", "application/jsonx", "application/json5", "text/json",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json\x00",
])
def test_other_bodies_get_415_naming_json(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMediaType, match="JSON"):
        _check_json(content_type)
