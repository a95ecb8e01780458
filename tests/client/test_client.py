"""The clients against a fake service (httpx.MockTransport): the requests they build, the results
they parse, and the errors they raise; the sync and async clients must behave the same."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from metanet_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncMetaNetClient,
    ClassifyResult,
    EncodedImage,
    InvalidImage,
    MetaNetClient,
    ModelInfo,
    NotFound,
    Overloaded,
    Prediction,
    RegistrationWarning,
    Task,
    TaskNotFound,
    UnexpectedResponse,
)

NOW = "2026-01-02T03:04:05.123456Z"
PIXELS = [[0, 255], [255, 0]]


def task_json(task_id: str = "t1", **overrides: Any) -> dict[str, Any]:
    return {"task_id": task_id, "name": "shapes", "labels": ["a", "b"], "n_way": 2, "n_examples": 3,
            "shots": {"a": 2, "b": 1}, "model_version": "m1", "created_at": NOW, "updated_at": NOW,
            "memory_bytes": 10, "some_future_field": True} | overrides


PREDICTION = {"label": "a", "confidence": 0.9, "support_similarity": 0.83,
              "top_k": [{"label": "a", "probability": 0.9}, {"label": "b", "probability": 0.1}],
              "attention": [{"example_index": 0, "label": "a", "weight": 0.7}]}
UNSURE = {"label": None, "confidence": 0.55, "support_similarity": -0.12,
          "top_k": [{"label": "b", "probability": 0.55}]}
WARNINGS = [
    {"type": "misclassified_example", "message": "example 1 ('b') is classified as 'a' (70%)",
     "details": {"example_index": 1, "label": "b", "predicted_label": "a", "confidence": 0.7}},
    {"type": "indistinguishable_examples", "message": "examples 0 ('a') and 1 ('b') look the same",
     "details": {"example_indices": [0, 1], "labels": ["a", "b"], "cosine": 0.999}},
]


class FakeService:
    """Answers like the service would, and records every request it saw."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.pages = {None: (["t1", "t2"], "c1"), "c1": (["t3"], None)}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        method, path = request.method, request.url.path
        if path == "/v1/tasks/missing" or path.startswith("/v1/tasks/missing/"):
            return error(404, "task_not_found", "no task 'missing'", {"task_id": "missing"})
        match method, path:
            case "POST", "/v1/tasks":
                return httpx.Response(201, json=task_json(name=self.body.get("name"), warnings=WARNINGS))
            case "GET", "/v1/tasks":
                ids, cursor = self.pages[request.url.params.get("cursor")]
                return httpx.Response(200, json={"data": [task_json(i) for i in ids], "next_cursor": cursor})
            case "GET", "/v1/tasks/t1":
                return httpx.Response(200, json=task_json())
            case "DELETE", "/v1/tasks/t1":
                return httpx.Response(204)
            case "POST", "/v1/tasks/t1/examples":
                return httpx.Response(200, json=task_json(n_examples=4))
            case "POST", "/v1/tasks/t1/classify":
                return httpx.Response(200, json={"task_id": "t1", "model_version": "m1",
                                                 "predictions": [PREDICTION] * len(self.body["images"])})
            case "POST", "/v1/classify":
                predictions = [UNSURE if "min_confidence" in self.body else PREDICTION]
                return httpx.Response(200, json={"model_version": "m1", "predictions": predictions})
            case "GET", "/v1/model":
                return httpx.Response(200, json={"name": "metanet", "version": "m1", "max_way": 20,
                                                 "max_examples": 100, "image_size": 28, "backend": "torch",
                                                 "device": "cpu"})
            case "GET", "/healthz":
                return httpx.Response(200, json={"status": "alive"})
            case "GET", "/readyz":
                return error(503, "not_ready", "loading", headers={"Retry-After": "5"})
        return error(404, "not_found", "no such route")

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    @property
    def body(self) -> Any:
        return json.loads(self.last.content)


def error(status: int, error_type: str, message: str, details: Any = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers,
                          json={"error": {"type": error_type, "message": message, "details": details}})


def sync_call(fake: Callable, method: str, *args: Any, **kwargs: Any) -> Any:
    with MetaNetClient("http://metanet.test", transport=httpx.MockTransport(fake)) as client:
        result = getattr(client, method)(*args, **kwargs)
        return list(result) if method == "iter_tasks" else result


def async_call(fake: Callable, method: str, *args: Any, **kwargs: Any) -> Any:
    async def run() -> Any:
        async with AsyncMetaNetClient("http://metanet.test", transport=httpx.MockTransport(fake)) as client:
            if method == "iter_tasks":
                return [task async for task in client.iter_tasks(*args, **kwargs)]
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(run())


@pytest.fixture(params=["sync", "async"])
def call(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return sync_call if request.param == "sync" else async_call


def test_create_task_posts_the_examples_and_parses_the_task(call: Callable) -> None:
    fake = FakeService()
    task = call(fake, "create_task", {"a": [PIXELS, PIXELS], "b": [EncodedImage("QUJD")]}, name="shapes")
    assert (fake.last.method, fake.last.url.path) == ("POST", "/v1/tasks")
    assert fake.last.headers["content-type"] == "application/json"
    assert fake.body == {"name": "shapes", "examples": [
        {"label": "a", "image": {"pixels": PIXELS}}, {"label": "a", "image": {"pixels": PIXELS}},
        {"label": "b", "image": "QUJD"}]}
    assert isinstance(task, Task)
    assert task.labels == ("a", "b") and task.shots == {"a": 2, "b": 1} and task.n_way == 2
    assert task.created_at == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    misclassified, indistinguishable = task.warnings
    assert isinstance(misclassified, RegistrationWarning) and misclassified.type == "misclassified_example"
    assert misclassified.details["predicted_label"] == "a" and "classified as" in misclassified.message
    assert indistinguishable.details == {"example_indices": [0, 1], "labels": ["a", "b"], "cosine": 0.999}


def test_a_task_without_warnings_or_from_an_older_server_has_none(call: Callable) -> None:
    assert call(FakeService(), "get_task", "t1").warnings == ()  # the fake's task has no such field
    assert Task.from_json(task_json(warnings=[])).warnings == ()


def test_create_task_without_a_name_sends_no_name(call: Callable) -> None:
    fake = FakeService()
    task = call(fake, "create_task", [("a", PIXELS), ("b", PIXELS)])
    assert "name" not in fake.body and task.name is None


def test_get_add_and_delete_use_the_task_path(call: Callable) -> None:
    fake = FakeService()
    assert call(fake, "get_task", "t1").task_id == "t1"
    assert call(fake, "add_examples", "t1", [("c", PIXELS)]).n_examples == 4
    assert fake.body == {"examples": [{"label": "c", "image": {"pixels": PIXELS}}]}
    assert call(fake, "delete_task", "t1") is None
    assert [(r.method, r.url.path) for r in fake.requests] == [
        ("GET", "/v1/tasks/t1"), ("POST", "/v1/tasks/t1/examples"), ("DELETE", "/v1/tasks/t1")]


def test_task_ids_are_escaped_and_dot_segments_refused(call: Callable) -> None:
    fake = FakeService()
    with pytest.raises(NotFound):
        call(fake, "get_task", "a/b?c")
    assert fake.last.url.raw_path == b"/v1/tasks/a%2Fb%3Fc"
    with pytest.raises(ValueError, match="not a task id"):
        call(fake, "get_task", "..")


def test_list_tasks_returns_one_page_and_iter_tasks_follows_the_cursor(call: Callable) -> None:
    fake = FakeService()
    page = call(fake, "list_tasks", limit=2)
    assert [t.task_id for t in page.data] == ["t1", "t2"] and page.next_cursor == "c1"
    assert dict(fake.last.url.params) == {"limit": "2"}
    assert [t.task_id for t in call(fake, "iter_tasks", page_size=2)] == ["t1", "t2", "t3"]
    assert dict(fake.last.url.params) == {"limit": "2", "cursor": "c1"}


def test_classify_sends_images_top_k_and_explain_and_parses_predictions(call: Callable) -> None:
    fake = FakeService()
    result = call(fake, "classify", "t1", [PIXELS, EncodedImage("QUJD")], top_k=2, explain=True)
    assert fake.body == {"images": [{"pixels": PIXELS}, "QUJD"], "top_k": 2, "explain": True}
    assert isinstance(result, ClassifyResult) and result.task_id == "t1" and len(result) == 2
    assert result.labels == ["a", "a"]
    first = result[0]
    assert isinstance(first, Prediction) and first.confidence == 0.9 and first.support_similarity == 0.83
    assert [(p.label, p.probability) for p in first.top_k] == [("a", 0.9), ("b", 0.1)]
    assert first.attention is not None and first.attention[0].example_index == 0


def test_min_confidence_is_sent_only_when_given_and_a_null_label_parsed(call: Callable) -> None:
    fake = FakeService()
    call(fake, "classify", "t1", [PIXELS], min_confidence=0.8)
    assert fake.body["min_confidence"] == 0.8
    call(fake, "classify", "t1", [PIXELS])
    assert "min_confidence" not in fake.body  # a server that predates it refuses unknown fields
    result = call(fake, "classify_once", {"a": [PIXELS], "b": [PIXELS]}, [PIXELS], min_confidence=0.6)
    assert fake.body["min_confidence"] == 0.6
    assert result.labels == [None] and result[0].confidence == 0.55 and result[0].support_similarity == -0.12


def test_a_prediction_from_a_server_without_support_similarity_has_none() -> None:
    old = {k: v for k, v in PREDICTION.items() if k != "support_similarity"}
    assert Prediction.from_json(old).support_similarity is None


def test_classify_once_sends_support_and_images(call: Callable) -> None:
    fake = FakeService()
    result = call(fake, "classify_once", {"a": [PIXELS], "b": [PIXELS]}, [PIXELS])
    assert fake.last.url.path == "/v1/classify"
    assert fake.body["support"][1] == {"label": "b", "image": {"pixels": PIXELS}}
    assert fake.body["top_k"] == 1 and fake.body["explain"] is False
    assert result.task_id is None and result[0].label == "a"


def test_model_info_and_probes(call: Callable) -> None:
    fake = FakeService()
    assert call(fake, "model_info") == ModelInfo("metanet", "m1", 20, 100, 28, "torch", "cpu")
    assert call(fake, "health") is True
    assert call(fake, "ready") is False  # 503 while loading is an answer, not an error


def test_errors_raise_with_the_api_type_message_and_details(call: Callable) -> None:
    with pytest.raises(TaskNotFound) as caught:
        call(FakeService(), "classify", "missing", [PIXELS])
    assert caught.value.status == 404 and caught.value.type == "task_not_found"
    assert caught.value.message == "no task 'missing'" and caught.value.details == {"task_id": "missing"}


def test_overloaded_carries_retry_after(call: Callable) -> None:
    def busy(request: httpx.Request) -> httpx.Response:
        return error(429, "overloaded", "queue full", headers={"Retry-After": "2"})

    with pytest.raises(Overloaded) as caught:
        call(busy, "get_task", "t1")
    assert caught.value.retry_after == 2.0


def test_invalid_image_is_raised_from_its_422(call: Callable) -> None:
    def reject(request: httpx.Request) -> httpx.Response:
        return error(422, "invalid_image", "images[0]: not an image", {"field": "images[0]", "index": 0})

    with pytest.raises(InvalidImage, match="not an image"):
        call(reject, "classify", "t1", [EncodedImage("AAAA")])


@pytest.mark.parametrize(("raised", "expected"), [
    (httpx.ConnectError("Connection refused"), APIConnectionError),
    (httpx.ReadTimeout("timed out"), APITimeoutError),
])
def test_transport_failures_raise_the_clients_own_errors_naming_the_url(
    call: Callable, raised: Exception, expected: type,
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    with pytest.raises(expected, match="metanet.test"):
        call(fail, "list_tasks")


def test_a_success_outside_the_contract_raises_unexpected_response(call: Callable) -> None:
    with pytest.raises(UnexpectedResponse, match="GET /v1/tasks/t1"):
        call(lambda request: httpx.Response(200, text="<html>hello</html>"), "get_task", "t1")
    with pytest.raises(UnexpectedResponse, match="KeyError"):
        call(lambda request: httpx.Response(200, json={"task_id": "t1"}), "get_task", "t1")


def test_the_api_key_is_sent_as_a_bearer_token_and_kept_out_of_repr() -> None:
    fake = FakeService()
    transport = httpx.MockTransport(fake)
    with MetaNetClient("http://metanet.test/", api_key="s3cret", transport=transport) as client:
        client.health()
        assert "s3cret" not in repr(client) and repr(client) == "MetaNetClient('http://metanet.test')"
    assert fake.last.headers["authorization"] == "Bearer s3cret"
    with MetaNetClient("http://metanet.test", transport=httpx.MockTransport(fake)) as client:
        client.health()
    assert "authorization" not in fake.last.headers


def test_a_base_url_with_a_path_prefixes_every_route() -> None:
    fake = FakeService()
    with MetaNetClient("http://metanet.test/metanet/", transport=httpx.MockTransport(fake)) as client:
        with pytest.raises(NotFound):  # the fake knows no prefix
            client.get_task("t1")
    assert fake.last.url.path == "/metanet/v1/tasks/t1"


def test_the_timeout_is_configurable() -> None:
    with MetaNetClient("http://metanet.test", timeout=1.5) as client:
        assert client._http.timeout == httpx.Timeout(1.5)
