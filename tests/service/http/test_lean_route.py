"""LeanRoute against FastAPI's own handler: the same /v1 endpoints served both ways in one app,
the same requests, the same answers (status, content type, body), the error cases included."""

from __future__ import annotations

import asyncio
import json
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from service.errors import TaskNotFound
from service.http.deps import AdmittedRoute, LeanRoute
from service.http.routes import v1
from service.http.schemas import AttentionWeight, LabelProbability, Prediction
from service.http.tenants import KeyRing
from service.process.app import create_app
from service.settings import Settings
from service.storage.records import TaskInfo

MOMENT = datetime(2026, 11, 27, 8, 0, 0, 123456, tzinfo=UTC)


class StubTasks:
    """Answers as TaskService does, without a model or a store: task "t1" exists, others do not."""

    max_examples = 100
    max_images = 128
    engine = types.SimpleNamespace(
        info=types.SimpleNamespace(name="metanet", version="v-stub", max_way=50, image_size=28,
                                   backend="torch", device="cpu"),
        check_admission=lambda n: None)

    async def get(self, owner: str, task_id: str) -> TaskInfo:
        if task_id != "t1":
            raise TaskNotFound(task_id)
        return TaskInfo("t1", owner, None, ("circle", "cross", "circle"), "v-stub", 1234, MOMENT, MOMENT)

    async def add_examples(self, owner: str, task_id: str, examples: Any) -> TaskInfo:
        return await self.get(owner, task_id)

    async def classify(self, owner: str, task_id: str, images: Any, top_k: int, explain: bool,
                       call: Any, min_confidence: float) -> list[Prediction]:
        await self.get(owner, task_id)
        return self._predictions(len(images), top_k, explain, min_confidence)

    async def classify_once(self, support: Any, images: Any, top_k: int, explain: bool,
                            call: Any, min_confidence: float) -> list[Prediction]:
        return self._predictions(len(images), top_k, explain, min_confidence)

    @staticmethod
    def _predictions(n: int, top_k: int, explain: bool, min_confidence: float) -> list[Prediction]:
        ranked = [LabelProbability(label="circle", probability=0.7),
                  LabelProbability(label="cross", probability=0.3)]
        attention = [AttentionWeight(example_index=0, label="circle", weight=1 / 3)] if explain else None
        label = "circle" if min_confidence <= 0.7 else None
        return [Prediction(label=label, confidence=0.7, support_similarity=0.5, top_k=ranked[:top_k],
                           attention=attention)] * n


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """The service's app (its routes lean), plus each /v1 route again under /fastapi, served by
    FastAPI's handler; the lifespan does not run, so the model never loads."""
    app = create_app(Settings(data_dir=Path(tmp_path_factory.mktemp("lean"))))
    plain = APIRouter(prefix="/fastapi", route_class=AdmittedRoute)
    for route in v1.routes:
        plain.add_api_route(route.path, route.endpoint, methods=sorted(route.methods),
                            status_code=route.status_code, responses=route.responses)
    app.include_router(plain)
    app.state.runtime.tasks = StubTasks()
    return app


def test_the_classify_routes_are_lean_and_the_register_route_is_not() -> None:
    lean = {(r.path, m) for r in v1.routes for m in r.methods
            if isinstance(r, LeanRoute) and r.get_route_handler().__qualname__.startswith("LeanRoute")}
    assert {("/v1/tasks/{task_id}/classify", "POST"), ("/v1/classify", "POST")} <= lean
    assert ("/v1/tasks", "POST") not in lean  # it sets Location: FastAPI's handler


PNG = "iVBORw0KGgo="
SUPPORT = [{"label": "circle", "image": PNG}, {"label": "cross", "image": PNG}]
REQUESTS = [
    ("POST", "/v1/tasks/t1/classify", json.dumps({"images": [PNG, PNG], "top_k": 2}).encode()),
    ("POST", "/v1/tasks/t1/classify", json.dumps({"images": [PNG], "explain": True}).encode()),
    ("POST", "/v1/tasks/t1/classify", json.dumps({"images": [PNG], "min_confidence": 0.9}).encode()),
    ("POST", "/v1/classify", json.dumps({"support": SUPPORT, "images": [PNG], "min_confidence": 1}).encode()),
    ("POST", "/v1/tasks/nope/classify", json.dumps({"images": [PNG]}).encode()),
    ("POST", "/v1/classify", json.dumps({"support": SUPPORT, "images": [PNG]}).encode()),
    ("POST", "/v1/tasks/t1/examples", json.dumps({"examples": SUPPORT}).encode()),
    ("GET", "/v1/tasks/t1", b""),
    ("GET", "/v1/tasks/nope", b""),
    ("GET", "/v1/model", b""),
    # what the body can get wrong
    ("POST", "/v1/tasks/t1/classify", b""),
    ("POST", "/v1/tasks/t1/classify", b"null"),
    ("POST", "/v1/tasks/t1/classify", b"[1, 2]"),
    ("POST", "/v1/tasks/t1/classify", b'"images"'),
    ("POST", "/v1/tasks/t1/classify", b'{"images": [], "top_k": 1}'),
    ("POST", "/v1/tasks/t1/classify", b'{"images": ["x"], "top_k": "3"}'),
    ("POST", "/v1/tasks/t1/classify", b'{"images": ["x"], "top_k": NaN}'),
    ("POST", "/v1/tasks/t1/classify", b'{"images": ["x"], "top_k": 1.5, "extra": 1}'),
    ("POST", "/v1/tasks/t1/classify", b'{"images": ["x"], "min_confidence": 1.5}'),
    ("POST", "/v1/tasks/t1/classify", b'{"images": ["x"], "min_confidence": "0.5"}'),
    ("POST", "/v1/classify", b'{"support": [], "images": ["x"], "min_confidence": true}'),
    ("POST", "/v1/tasks/t1/classify", b'{"images": [{"pixels": [[0, 1]], "more": 2}]}'),
    ("POST", "/v1/tasks/t1/classify", b'{"images": ['),
    ("POST", "/v1/tasks/t1/classify", '{"images": ["\u00e9t\u00e9"]}'.encode("latin-1")),
    ("POST", "/v1/tasks/t1/classify", b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("POST", "/v1/tasks/t1/classify", b'{"images": ["x"], "top_k": ' + b"1" * 5000 + b"}"),
    ("POST", "/v1/tasks/t1/classify", b"\xef\xbb\xbf" + json.dumps({"images": [PNG]}).encode()),
    ("POST", "/v1/tasks/t1/classify", json.dumps({"images": [PNG]}).encode("utf-16")),
    ("POST", "/v1/classify", b'{"support": [{"label": 7, "image": "x"}], "images": "x"}'),
    ("POST", "/v1/tasks/t1/examples", b'{"examples": [{"label": "", "image": 3}]}'),
]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS,
                         ids=[f"{m} {p} {b[:30]!r}" for m, p, b in REQUESTS])
def test_lean_and_fastapi_handlers_answer_alike(app: FastAPI, method: str, path: str, body: bytes) -> None:
    lean, plain = asyncio.run(_both(app, method, path, body))
    assert lean.status_code == plain.status_code, (lean.text, plain.text)
    assert lean.headers.get("content-type") == plain.headers.get("content-type")
    assert lean.json() == plain.json()


def test_a_bad_body_loses_to_not_ready_as_in_fastapi(app: FastAPI) -> None:
    tasks, app.state.runtime.tasks = app.state.runtime.tasks, None
    try:
        for body in (b"", b"[1]", b'{"images": 3}'):
            lean, plain = asyncio.run(_both(app, "POST", "/v1/classify", body))
            assert lean.status_code == plain.status_code == 503
            assert lean.json() == plain.json()
            assert lean.headers["retry-after"] == plain.headers["retry-after"] == "5"
    finally:
        app.state.runtime.tasks = tasks


async def _both(app: FastAPI, method: str, path: str, body: bytes) -> tuple[httpx.Response, httpx.Response]:
    headers = {"content-type": "application/json"} if body else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        lean = await client.request(method, path, content=body, headers=headers)
        plain = await client.request(method, "/fastapi" + path, content=body, headers=headers)
    return lean, plain


class CountingKeys:
    """A KeyRing that counts its lookups (each hashes the token and compares it with every key)."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring, self.lookups = ring, 0

    def __bool__(self) -> bool:
        return bool(self.ring)

    def owner(self, authorization: str | None) -> str | None:
        self.lookups += 1
        return self.ring.owner(authorization)


def test_the_callers_key_is_looked_up_once_a_request(app: FastAPI) -> None:
    keys, app.state.runtime.keys = app.state.runtime.keys, CountingKeys(KeyRing(["k-one"]))
    try:
        async def ask(path: str, key: str) -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post(path, json={"images": [PNG]},
                                         headers={"authorization": f"Bearer {key}"})

        for path in ("/v1/tasks/t1/classify", "/fastapi/v1/tasks/t1/classify"):
            app.state.runtime.keys.lookups = 0
            assert asyncio.run(ask(path, "k-one")).status_code == 200
            assert app.state.runtime.keys.lookups == 1
            refused = asyncio.run(ask(path, "k-two"))
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
    finally:
        app.state.runtime.keys = keys
