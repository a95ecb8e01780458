"""Three tenants on one server: no request with one key learns anything about another key's tasks.

For every route that names a task, another tenant's task must answer exactly as a task that does
not exist (status and body, the id aside); lists, cursors and one-off classifications must not
change with what others do; and the owner's tasks must be untouched by anything others send.
Keys come from METANET_API_KEYS and from a keys file; /metrics takes a separate operator key.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests.helpers import QUERIES, Server, assert_error, examples, png, probabilities

ALICE, BOB, CAROL = "alice-7f3a9c1e", "bob-2b8d4e6f", "carol-9e1c5a7b"
OPERATOR = "metrics-5d2f8a3c"
KEYS = (ALICE, BOB, CAROL)
NEVER = "0123456789abcdef0123456789abcdef"  # a task id no one has


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("tenants")
    keys_file = root / "keys"
    keys_file.write_text(f"# one key per line\n{CAROL}  # carol, from the file\n")
    server = Server(root / "data", api_keys=f"{ALICE},{BOB}", api_keys_file=keys_file, metrics_keys=OPERATOR)
    try:
        yield server.start()
    finally:
        server.stop()


def register(client: httpx.Client, kinds: tuple[str, ...], name: str) -> dict[str, Any]:
    response = client.post("/v1/tasks", json={"name": name, "examples": examples(kinds)})
    assert response.status_code == 201, response.text
    return response.json()


def listing(client: httpx.Client, limit: int = 1) -> tuple[list[dict[str, Any]], list[str]]:
    """Every task the key sees, page by page, and the cursors it was handed on the way."""
    tasks, cursors, cursor = [], [], None
    while True:
        page = client.get("/v1/tasks", params={"limit": limit, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        tasks += page.json()["data"]
        if (cursor := page.json()["next_cursor"]) is None:
            return tasks, cursors
        cursors.append(cursor)


def probes(task_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every request that names a task: valid ones, and ones that would be invalid for its owner."""
    base = f"/v1/tasks/{task_id}"
    return [
        ("GET", base, {}),
        ("POST", f"{base}/classify", {"json": {"images": QUERIES, "top_k": 5, "explain": True}}),
        ("POST", f"{base}/classify", {"json": {"images": [png("circle")] * 129}}),  # over the default 128
        ("POST", f"{base}/classify", {"json": {"images": ["not base64!"]}}),
        ("POST", f"{base}/examples", {"json": {"examples": examples(("bar",))}}),
        ("POST", f"{base}/examples", {"json": {"examples": [{"label": "x", "image": "garbage"}]}}),
        ("DELETE", base, {}),
    ]


def anonymised(response: httpx.Response, task_id: str) -> tuple[int, str]:
    return response.status_code, response.text.replace(task_id, "<id>")


def test_another_keys_task_answers_exactly_as_a_task_that_does_not_exist(server: Server) -> None:
    with server.as_user(ALICE) as alice, server.as_user(BOB) as bob, server.as_user(CAROL) as carol:
        owned = {ALICE: register(alice, ("circle", "cross", "triangle"), "alice's"),
                 CAROL: register(carol, ("square", "zigzag"), "carol's")}
        before = {key: (client.get(f"/v1/tasks/{t['task_id']}").json(), probabilities(client, t["task_id"]))
                  for (key, t), client in zip(owned.items(), (alice, carol), strict=True)}

        for stranger, client in ((BOB, bob), (CAROL, carol), (ALICE, alice)):
            for owner, task in owned.items():
                if owner == stranger:
                    continue
                theirs, nobodys = probes(task["task_id"]), probes(NEVER)
                for (method, path, kwargs), (_, never_path, _) in zip(theirs, nobodys, strict=True):
                    got = client.request(method, path, **kwargs)
                    expected = client.request(method, never_path, **kwargs)
                    assert got.status_code == 404, (method, path, got.text)
                    assert_error(got, 404, "task_not_found")
                    assert anonymised(got, task["task_id"]) == anonymised(expected, NEVER), (method, path)

        # The owners' tasks are exactly as they were, and still classify the same.
        for (key, task), client in zip(owned.items(), (alice, carol), strict=True):
            record, probs = before[key]
            assert client.get(f"/v1/tasks/{task['task_id']}").json() == record
            np.testing.assert_allclose(probabilities(client, task["task_id"]), probs, atol=1e-6, rtol=0)


def test_lists_and_cursors_do_not_change_with_what_other_keys_do(server: Server) -> None:
    with server.as_user(ALICE) as alice, server.as_user(BOB) as bob, server.as_user(CAROL) as carol:
        mine = [register(bob, ("circle", "bar"), f"bob-{i}") for i in range(3)]
        seen, cursors = listing(bob)
        assert [t["task_id"] for t in seen] == [t["task_id"] for t in mine]

        # Others register, extend and delete in between and after Bob's tasks.
        for client in (alice, carol):
            for i in range(4):
                task = register(client, ("cross", "square"), f"other-{i}")
                if i % 2:
                    assert client.delete(f"/v1/tasks/{task['task_id']}").status_code == 204
                else:
                    more = client.post(f"/v1/tasks/{task['task_id']}/examples",
                                       json={"examples": examples(("triangle",))})
                    assert more.status_code == 200, more.text

        assert listing(bob) == (seen, cursors)  # the same tasks, and byte-identical cursors
        for client in (alice, carol):
            theirs, _ = listing(client, limit=200)
            assert not {t["task_id"] for t in theirs} & {t["task_id"] for t in mine}


def test_a_cursor_handed_to_one_key_is_refused_for_another(server: Server) -> None:
    with server.as_user(ALICE) as alice, server.as_user(BOB) as bob:
        for i in range(2):
            register(alice, ("circle", "cross"), f"paged-{i}")
        cursor = alice.get("/v1/tasks", params={"limit": 1}).json()["next_cursor"]
        assert cursor is not None
        assert_error(bob.get("/v1/tasks", params={"cursor": cursor}), 422, "invalid_input")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        assert b"after" not in raw and not raw.startswith(b"{")  # opaque: no sequence number in the clear


def test_a_one_off_classification_stores_nothing_and_answers_every_key_alike(server: Server) -> None:
    body = {"support": examples(("circle", "cross", "triangle")), "images": QUERIES, "top_k": 3}
    with server.as_user(ALICE) as alice, server.as_user(BOB) as bob, server.as_user(CAROL) as carol:
        lists = [listing(c, limit=200) for c in (alice, bob, carol)]
        answers = []
        for client in (alice, bob, carol):
            response = client.post("/v1/classify", json=body)
            assert response.status_code == 200, response.text
            answers.append(response.json())
        assert answers[0] == answers[1] == answers[2]
        assert [listing(c, limit=200) for c in (alice, bob, carol)] == lists


def test_every_key_from_the_environment_and_the_file_works_and_others_get_401(server: Server) -> None:
    for key in KEYS:
        with server.as_user(key) as client:
            assert client.get("/v1/model").status_code == 200, key
    for bad in (OPERATOR, f"{ALICE}x", ALICE[:-1], ALICE.upper()):
        with server.as_user(bad) as client:
            assert_error(client.get("/v1/tasks"), 401, "unauthorized")


def test_metrics_take_the_operator_key_and_no_tenant_key(server: Server) -> None:
    with server.client() as anonymous:
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200
        assert_error(anonymous.get("/metrics"), 401, "unauthorized")
    for key in KEYS:
        with server.as_user(key) as tenant:
            assert_error(tenant.get("/metrics"), 401, "unauthorized")
    with server.as_user(OPERATOR) as operator:
        response = operator.get("/metrics")
        assert response.status_code == 200 and "metanet_tasks" in response.text


def test_the_request_log_has_one_json_line_per_request_and_never_a_key(server: Server) -> None:
    with server.as_user(ALICE) as alice:
        task = register(alice, ("circle", "cross"), "logged")
        response = alice.get(f"/v1/tasks/{task['task_id']}", headers={"X-Request-ID": "isolation-log-1"})
        assert response.headers["x-request-id"] == "isolation-log-1"
        missing = alice.get(f"/v1/tasks/{NEVER}")
        assert re.fullmatch(r"[0-9a-f]{32}", missing.headers["x-request-id"])
    # The server writes a request's line after the response has gone out, so the last one may
    # land a moment after the client has its answer: wait for it rather than read once.
    deadline = time.monotonic() + 10
    while True:
        text = server.log_path.read_text()
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        logged = any(e.get("request_id") == missing.headers["x-request-id"] for e in lines)
        if logged or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for key in (*KEYS, OPERATOR):
        assert key not in text
    (line,) = [entry for entry in lines if entry.get("request_id") == "isolation-log-1"]
    assert line["route"] == "/v1/tasks/{task_id}" and line["method"] == "GET" and line["status"] == 200
    assert line["task_id"] == task["task_id"] and line["latency_ms"] >= 0
    assert re.fullmatch(r"[0-9a-f]{8}", line["owner"])
    (created,) = [e for e in lines if e.get("route") == "/v1/tasks" and e.get("task_id") == task["task_id"]]
    assert created["status"] == 201
    (lost,) = [e for e in lines if e.get("request_id") == missing.headers["x-request-id"]]
    assert lost["status"] == 404
