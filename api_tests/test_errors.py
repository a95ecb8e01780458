"""Every error status of the contract, from realistic bad requests; none of them changes anything.

After each rejected request the task list is unchanged and the sentinel tasks give the same
probabilities as before (to 1e-6).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from api_tests.conftest import SERVER_SETTINGS
from api_tests.helpers import QUERIES, assert_error, b64, bomb_png, encode, examples, glyph, png, tiny_pixels

PNG = png("circle")
TRUNCATED_PNG_BYTES = encode(glyph("circle"))[:200]
TEXT_AS_PNG = "data:image/png;base64," + b64(b"Hello, I am a text file wearing a .png extension.\n")
BOMB = b64(bomb_png(20000))
UNKNOWN = "0123456789abcdef0123456789abcdef"
BLANK = b64(encode(Image.new("L", (105, 105), 255)))  # an empty page: no glyph to learn from


def support_with(image: Any, at: int = 1) -> dict[str, Any]:
    """A valid 3-example support set whose example `at` is `image`."""
    support = examples(("circle", "cross", "triangle"))
    support[at] = {"label": support[at]["label"], "image": image}
    return {"examples": support}


TASKS = "/v1/tasks"
CLASSIFY, EXAMPLES = "/v1/tasks/{task}/classify", "/v1/tasks/{task}/examples"
JSON = {"content-type": "application/json"}
LIMITS = SERVER_SETTINGS


def case(name: str, method: str, path: str, status: int, error_type: str, field: str | None = None,
         **request: Any) -> Any:
    """One bad request: what is sent (httpx keyword arguments), and the status, error type and
    field (with its example index) the answer must name."""
    return pytest.param(method, path, request, status, error_type, field, id=name)


def pixels_examples(n: int, n_labels: int) -> dict[str, Any]:
    return {"examples": [{"label": f"c{i % n_labels}", "image": tiny_pixels(i)} for i in range(n)]}


CASES = [
    # 400: not JSON at all
    case("malformed_json", "POST", TASKS, 400, "malformed_json", content=b'{"examples": [', headers=JSON),
    case("single_quoted_json", "POST", CLASSIFY, 400, "malformed_json",
         content=b"{'images': []}", headers=JSON),
    case("latin1_bytes_not_utf8", "POST", CLASSIFY, 400, "malformed_json",
         content='{"images": ["\u00e9t\u00e9"]}'.encode("latin-1"), headers=JSON),
    case("random_bytes", "POST", "/v1/classify", 400, "malformed_json",
         content=b"Df\xb1Y\xe2D\xd0~\xa3\x05", headers=JSON),
    case("nested_100000_deep", "POST", EXAMPLES, 400, "malformed_json",
         content=b'{"examples": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=JSON),
    case("register_latin1_bytes", "POST", TASKS, 400, "malformed_json",
         content='{"name": "\u00e9t\u00e9"}'.encode("latin-1"), headers=JSON),
    case("register_nested_100000_deep", "POST", TASKS, 400, "malformed_json",
         content=b'{"examples": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=JSON),
    case("integer_of_5000_digits", "POST", CLASSIFY, 400, "malformed_json",
         content=b'{"images": ["x"], "top_k": ' + b"1" * 5000 + b"}", headers=JSON),
    case("register_integer_of_5000_digits", "POST", TASKS, 400, "malformed_json",
         content=b'{"name": ' + b"1" * 5000 + b"}", headers=JSON),
    case("empty_body", "POST", CLASSIFY, 422, "invalid_input", headers=JSON),
    case("classify_body_is_a_list", "POST", CLASSIFY, 422, "invalid_input", json=[PNG]),
    case("classify_body_is_null", "POST", CLASSIFY, 422, "invalid_input", content=b"null", headers=JSON),
    # 404
    case("get_unknown_task", "GET", f"{TASKS}/{UNKNOWN}", 404, "task_not_found"),
    case("delete_unknown_task", "DELETE", f"{TASKS}/{UNKNOWN}", 404, "task_not_found"),
    case("classify_unknown_task", "POST", f"{TASKS}/{UNKNOWN}/classify", 404, "task_not_found",
         json={"images": QUERIES}),
    case("add_examples_to_unknown_task", "POST", f"{TASKS}/{UNKNOWN}/examples", 404, "task_not_found",
         json={"examples": examples(("circle", "cross"))}),
    case("unknown_route", "GET", "/v1/nothing-here", 404, "not_found"),
    # 413: body or image too large
    case("body_over_the_limit", "POST", TASKS, 413, "body_too_large", headers=JSON,
         content=b'{"examples": "' + b"A" * LIMITS["max_body_bytes"] + b'"}'),
    case("png_bomb_20000x20000", "POST", TASKS, 413, "image_too_large", "examples[1].image",
         json=support_with(BOMB)),
    case("png_bomb_in_classify", "POST", CLASSIFY, 413, "image_too_large", "images[1]",
         json={"images": [PNG, BOMB]}),
    # 415
    case("text_plain_body", "POST", TASKS, 415, "unsupported_media_type",
         content=json.dumps(support_with(PNG)), headers={"content-type": "text/plain"}),
    case("form_body", "POST", CLASSIFY, 415, "unsupported_media_type", data={"images": PNG}),
    case("no_content_type", "POST", "/v1/classify", 415, "unsupported_media_type",
         content=b'{"support": [], "images": []}'),
    # 422: images that are not images
    case("truncated_base64", "POST", TASKS, 422, "invalid_image", "examples[1].image",
         json=support_with(PNG[:-7])),
    case("truncated_png_file", "POST", TASKS, 422, "invalid_image", "examples[1].image",
         json=support_with(b64(TRUNCATED_PNG_BYTES))),
    case("text_file_posing_as_png", "POST", TASKS, 422, "invalid_image", "examples[2].image",
         json=support_with(TEXT_AS_PNG, at=2)),
    case("data_url_not_base64", "POST", CLASSIFY, 422, "invalid_image", "images[0]",
         json={"images": ["data:image/png,abc"]}),
    case("empty_image_string", "POST", CLASSIFY, 422, "invalid_image", "images[0]", json={"images": [""]}),
    case("ragged_pixels", "POST", CLASSIFY, 422, "invalid_image", "images[0]",
         json={"images": [{"pixels": [[0, 255], [0]]}]}),
    case("pixels_above_255", "POST", CLASSIFY, 422, "invalid_image", "images[0]",
         json={"images": [{"pixels": [[0, 300]]}]}),
    case("float_pixels_above_1", "POST", CLASSIFY, 422, "invalid_image", "images[0]",
         json={"images": [{"pixels": [[0.0, 1.5]]}]}),
    case("string_pixels", "POST", CLASSIFY, 422, "invalid_image", "images[0]",
         json={"images": [{"pixels": [["0", "1"]]}]}),
    case("one_dimensional_pixels", "POST", CLASSIFY, 422, "invalid_image", "images[0]",
         json={"images": [{"pixels": [0, 255]}]}),
    case("image_is_a_number", "POST", TASKS, 422, "invalid_image", "examples[2].image",
         json=support_with(12345, at=2)),
    # 422: support images with nothing drawn (a query may be blank: it is answered)
    case("blank_support_image", "POST", TASKS, 422, "invalid_image", "examples[1].image",
         json=support_with(BLANK)),
    case("blank_support_pixels", "POST", TASKS, 422, "invalid_image", "examples[2].image",
         json=support_with({"pixels": [[0] * 8] * 8}, at=2)),
    case("one_off_with_a_blank_support_image", "POST", "/v1/classify", 422, "invalid_image",
         "support[0].image",
         json={"support": [{"label": "blank", "image": BLANK}, *examples(("circle", "cross"))],
               "images": QUERIES}),
    case("add_examples_with_a_blank_image", "POST", EXAMPLES, 422, "invalid_image", "examples[1].image",
         json={"examples": [{"label": "circle", "image": PNG}, {"label": "new", "image": BLANK}]}),
    # 422: JSON of the wrong types and shapes
    case("examples_not_a_list", "POST", TASKS, 422, "invalid_input", "examples", json={"examples": "circle"}),
    case("label_is_a_number", "POST", TASKS, 422, "invalid_input", "examples[0].label",
         json={"examples": [{"label": 7, "image": PNG}, {"label": "b", "image": PNG}]}),
    case("empty_label", "POST", TASKS, 422, "invalid_input", "examples[1].label",
         json={"examples": [{"label": "a", "image": PNG}, {"label": "", "image": PNG}]}),
    case("name_is_a_list", "POST", TASKS, 422, "invalid_input", "name",
         json={"name": ["x"], **support_with(PNG)}),
    case("body_is_a_list", "POST", TASKS, 422, "invalid_input", json=[1, 2]),
    case("unknown_field", "POST", CLASSIFY, 422, "invalid_input", "topk",
         json={"images": QUERIES, "topk": 3}),
    case("top_k_is_a_string", "POST", CLASSIFY, 422, "invalid_input", "top_k",
         json={"images": QUERIES, "top_k": "three"}),
    case("top_k_is_a_numeric_string", "POST", CLASSIFY, 422, "invalid_input", "top_k",
         json={"images": QUERIES, "top_k": "3"}),
    case("explain_is_a_string", "POST", CLASSIFY, 422, "invalid_input", "explain",
         json={"images": QUERIES, "explain": "yes"}),
    case("top_k_zero", "POST", CLASSIFY, 422, "invalid_input", "top_k", json={"images": QUERIES, "top_k": 0}),
    case("images_not_a_list", "POST", CLASSIFY, 422, "invalid_input", "images", json={"images": PNG}),
    case("no_images", "POST", CLASSIFY, 422, "invalid_input", "images", json={"images": []}),
    case("too_many_images", "POST", CLASSIFY, 422, "invalid_input", "images",
         json={"images": [tiny_pixels(i) for i in range(LIMITS["max_images_per_request"] + 1)]}),
    case("list_limit_zero", "GET", f"{TASKS}?limit=0", 422, "invalid_input", "limit"),
    case("list_limit_huge", "GET", f"{TASKS}?limit=100000", 422, "invalid_input", "limit"),
    case("list_bad_cursor", "GET", f"{TASKS}?cursor=not-a-cursor", 422, "invalid_input", "cursor"),
    # 422: support sets the model cannot take
    case("no_examples", "POST", TASKS, 422, "invalid_input", "examples", json={"examples": []}),
    case("missing_examples", "POST", TASKS, 422, "invalid_input", "examples", json={"name": "x"}),
    case("one_label", "POST", TASKS, 422, "invalid_input", "examples",
         json={"examples": [{"label": "a", "image": PNG}, {"label": "a", "image": png("cross")}]}),
    case("more_labels_than_max_way", "POST", TASKS, 422, "invalid_input", "examples",
         json=pixels_examples(51, n_labels=51)),
    case("more_examples_than_configured", "POST", TASKS, 422, "invalid_input", "examples",
         json=pixels_examples(LIMITS["max_examples"] + 1, n_labels=5)),
    case("one_off_with_one_label", "POST", "/v1/classify", 422, "invalid_input", "support",
         json={"support": [{"label": "a", "image": PNG}], "images": QUERIES}),
    case("one_off_with_a_bad_query", "POST", "/v1/classify", 422, "invalid_image", "images[1]",
         json={"support": examples(("circle", "cross")), "images": [PNG, PNG[:-7]]}),
    case("add_examples_with_a_bad_image", "POST", EXAMPLES, 422, "invalid_image", "examples[1].image",
         json={"examples": [{"label": "circle", "image": PNG}, {"label": "new", "image": TEXT_AS_PNG}]}),
    case("add_examples_past_max_examples", "POST", EXAMPLES, 422, "invalid_input", "examples",
         json=pixels_examples(LIMITS["max_examples"] - 2, n_labels=1)),
    case("add_no_examples", "POST", EXAMPLES, 422, "invalid_input", "examples", json={"examples": []}),
    # 405 is not in the contract's list, but answers in its shape too
    case("method_not_allowed", "PUT", TASKS, 405, "method_not_allowed", json={}),
]


@pytest.fixture(scope="module")
def listing_before(sentinel) -> Iterator[list[dict[str, Any]]]:
    yield sentinel.listing()


@pytest.mark.parametrize(("method", "path", "request_kwargs", "status", "error_type", "field"), CASES)
def test_rejected_request_answers_in_the_contract_shape_and_changes_nothing(
    client: httpx.Client, sentinel, listing_before, method, path, request_kwargs, status, error_type, field
) -> None:
    path = path.format(task=sentinel.tasks[0]["task_id"])
    error = assert_error(client.request(method, path, **request_kwargs), status, error_type)
    if field is not None:
        assert error["message"].startswith(f"{field}:"), error
        assert error["details"]["field"] == field
        index = field.partition("[")[2].partition("]")[0]
        assert error["details"].get("index") == (int(index) if index else None)
    sentinel.assert_unchanged(listing_before)


def test_chunked_body_over_the_limit_is_refused_while_streaming(client, sentinel, listing_before) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"images": ["'
        for _ in range(SERVER_SETTINGS["max_body_bytes"] // 65536 + 2):
            yield b"A" * 65536
        yield b'"]}'

    task_id = sentinel.tasks[0]["task_id"]
    response = client.post(f"/v1/tasks/{task_id}/classify", content=chunks(),
                           headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers  # chunked transfer encoding
    assert_error(response, 413, "body_too_large")
    sentinel.assert_unchanged(listing_before)
