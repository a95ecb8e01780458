"""Task life cycle: register, get, list with pagination, add examples, delete."""

from __future__ import annotations

from datetime import datetime

import httpx
import numpy as np

from api_tests.helpers import QUERIES, assert_error, examples, png, probabilities


def register(client: httpx.Client, kinds: tuple[str, ...], name: str | None = None) -> dict:
    response = client.post("/v1/tasks", json={"name": name, "examples": examples(kinds)})
    assert response.status_code == 201, response.text
    return response.json()


def test_register_returns_201_with_location_and_the_task(client: httpx.Client) -> None:
    support = examples(("circle", "cross")) + [{"label": "circle", "image": png("circle", shift=(5, 5))}]
    response = client.post("/v1/tasks", json={"name": "shapes", "examples": support})
    assert response.status_code == 201, response.text
    task = response.json()
    assert response.headers["location"] == f"/v1/tasks/{task['task_id']}"
    assert task["name"] == "shapes"
    assert task["labels"] == ["circle", "cross"]  # order of first appearance
    assert task["n_way"] == 2
    assert task["n_examples"] == 3
    assert task["shots"] == {"circle": 2, "cross": 1}
    assert task["model_version"] == client.get("/v1/model").json()["version"]
    assert task["memory_bytes"] > 0
    created = datetime.fromisoformat(task["created_at"])  # RFC 3339, with its offset
    assert created.utcoffset() is not None


def test_register_without_a_name_gives_null_name(client: httpx.Client) -> None:
    response = client.post("/v1/tasks", json={"examples": examples(("bar", "zigzag"))})
    assert response.status_code == 201
    assert response.json()["name"] is None


def test_get_task_returns_the_registered_record(client: httpx.Client, sentinel) -> None:
    task = sentinel.tasks[0]
    response = client.get(f"/v1/tasks/{task['task_id']}")
    assert response.status_code == 200
    assert response.json() == task


def test_list_pages_through_every_task_in_creation_order(client: httpx.Client, sentinel) -> None:
    created = [register(client, ("circle", "bar"), name=f"page-{i}")["task_id"] for i in range(3)]
    everything = sentinel.listing()
    ids = [t["task_id"] for t in everything]
    assert [i for i in ids if i in created] == created
    stamps = [t["created_at"] for t in everything]
    assert stamps == sorted(stamps)

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/tasks", params=params).json()
        assert len(page["data"]) <= 2
        seen += [t["task_id"] for t in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert pages == -(-len(ids) // 2)


def test_list_default_page_has_null_next_cursor_when_everything_fits(client: httpx.Client) -> None:
    page = client.get("/v1/tasks").json()
    assert set(page) == {"data", "next_cursor"}
    if len(page["data"]) < 50:
        assert page["next_cursor"] is None


def test_delete_returns_204_then_the_task_is_gone(client: httpx.Client) -> None:
    task_id = register(client, ("square", "triangle"))["task_id"]
    response = client.delete(f"/v1/tasks/{task_id}")
    assert response.status_code == 204
    assert response.content == b""
    assert_error(client.get(f"/v1/tasks/{task_id}"), 404, "task_not_found")
    assert_error(client.delete(f"/v1/tasks/{task_id}"), 404, "task_not_found")
    listed = client.get("/v1/tasks", params={"limit": 200}).json()["data"]
    assert task_id not in [t["task_id"] for t in listed]


def test_add_examples_with_a_new_label_returns_200_and_the_grown_task(client: httpx.Client) -> None:
    task = register(client, ("circle", "cross"), name="growing")
    before = probabilities(client, task["task_id"])
    more = [{"label": "cross", "image": png("cross", shift=(4, 4))},
            {"label": "triangle", "image": png("triangle")}]
    response = client.post(f"/v1/tasks/{task['task_id']}/examples", json={"examples": more})
    assert response.status_code == 200, response.text
    grown = response.json()
    assert grown["task_id"] == task["task_id"]
    assert grown["labels"] == ["circle", "cross", "triangle"]
    assert grown["n_way"] == 3 and grown["n_examples"] == 4
    assert grown["shots"] == {"circle": 1, "cross": 2, "triangle": 1}
    assert grown["created_at"] == task["created_at"]
    assert grown["memory_bytes"] > task["memory_bytes"]
    assert client.get(f"/v1/tasks/{task['task_id']}").json() == grown
    after = probabilities(client, task["task_id"])
    assert before.shape == (len(QUERIES), 2) and after.shape == (len(QUERIES), 3)


def test_add_examples_gives_the_same_predictions_as_registering_the_whole_support(client) -> None:
    first, second = examples(("circle", "cross")), examples(("square",))
    grown = register(client, ("circle", "cross"))["task_id"]
    assert client.post(f"/v1/tasks/{grown}/examples", json={"examples": second}).status_code == 200
    whole = client.post("/v1/tasks", json={"examples": first + second}).json()["task_id"]
    np.testing.assert_allclose(probabilities(client, grown), probabilities(client, whole), atol=1e-6, rtol=0)
