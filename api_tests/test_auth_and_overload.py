"""A second server with API keys and a one-slot model queue: 401, per-key isolation, and 429."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from api_tests.helpers import QUERIES, Server, assert_error, examples, png

ALICE, BOB = "alice-key-0123", "bob-key-4567"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("keyed") / "data", api_keys=f"{ALICE},{BOB}", max_pending=1)
    try:
        yield server.start()
    finally:
        server.stop()


def test_v1_without_a_key_returns_401_with_a_bearer_challenge(keyed_server: Server) -> None:
    with keyed_server.client() as anonymous:
        for method, path in (("GET", "/v1/model"), ("GET", "/v1/tasks"), ("POST", "/v1/classify")):
            response = anonymous.request(method, path, json={})
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"


def test_v1_with_an_unknown_key_returns_401(keyed_server: Server) -> None:
    with keyed_server.as_user("not-a-key") as stranger:
        assert_error(stranger.get("/v1/tasks"), 401, "unauthorized")


def test_probes_need_no_key(keyed_server: Server) -> None:
    with keyed_server.client() as anonymous:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert anonymous.get(path).status_code == 200


def test_each_key_sees_only_its_own_tasks(keyed_server: Server) -> None:
    with keyed_server.as_user(ALICE) as alice, keyed_server.as_user(BOB) as bob:
        response = alice.post("/v1/tasks", json={"examples": examples(("circle", "cross"))})
        assert response.status_code == 201, response.text
        task_id = response.json()["task_id"]

        assert_error(bob.get(f"/v1/tasks/{task_id}"), 404, "task_not_found")
        classify = bob.post(f"/v1/tasks/{task_id}/classify", json={"images": QUERIES})
        assert_error(classify, 404, "task_not_found")
        more = bob.post(f"/v1/tasks/{task_id}/examples", json={"examples": examples(("bar",))})
        assert_error(more, 404, "task_not_found")
        assert_error(bob.delete(f"/v1/tasks/{task_id}"), 404, "task_not_found")
        assert bob.get("/v1/tasks").json() == {"data": [], "next_cursor": None}

        assert alice.get(f"/v1/tasks/{task_id}").status_code == 200
        assert [t["task_id"] for t in alice.get("/v1/tasks").json()["data"]] == [task_id]


def test_a_burst_past_the_model_queue_gets_429_with_retry_after_and_stores_nothing_for_it(keyed_server):
    def register(i: int) -> httpx.Response:
        body = {"name": f"burst-{i}", "examples": examples(("circle", "square")) + [
            {"label": "zigzag", "image": png("zigzag", shift=(i, 0))}]}
        with keyed_server.as_user(BOB) as bob:
            return bob.post("/v1/tasks", json=body)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(register, range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {201, 429} and 201 in statuses and 429 in statuses, statuses
    for response in responses:
        if response.status_code == 429:
            assert_error(response, 429, "overloaded")
            assert int(response.headers["retry-after"]) >= 1
    created = {r.json()["task_id"] for r in responses if r.status_code == 201}
    with keyed_server.as_user(BOB) as bob:
        assert {t["task_id"] for t in bob.get("/v1/tasks").json()["data"]} == created
