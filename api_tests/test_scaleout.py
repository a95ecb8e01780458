"""Scale-out: two replicas sharing a Redis task store behind nginx, as docker/compose.yaml lays
them out. Any replica serves any task, a delete or an update on one is seen by the other, nginx
keeps each task on one replica and routes around a dead one, and Redis keeps every task across a
restart.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests.cluster import Nginx, RedisServer, replica_port, replica_settings
from api_tests.helpers import GLYPHS, QUERIES, Server, assert_error, examples

pytestmark = pytest.mark.scaleout


@dataclass
class Cluster:
    redis: RedisServer
    replicas: list[Server]
    nginx: Nginx

    def lb(self) -> httpx.Client:
        return httpx.Client(base_url=self.nginx.url, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("scaleout")
    redis = RedisServer(base / "redis")
    # One torch thread each: two replicas (and whatever else) share the test machine's cores.
    replicas = [Server(base / f"replica-{i}", store_url=redis.url, torch_threads=1, **replica_settings())
                for i in (1, 2)]
    nginx = Nginx(base / "nginx", replicas, replica_port())
    try:
        redis.start()
        for replica in replicas:
            replica.start(wait=False)
        for replica in replicas:
            replica.wait_ready()
        nginx.start()
        yield Cluster(redis, replicas, nginx)
    finally:
        nginx.stop()
        for replica in replicas:
            if replica.process is not None:
                replica.stop()
        redis.stop()


def register(client: httpx.Client, kinds: tuple[str, ...], name: str = "scaleout") -> dict[str, Any]:
    response = client.post("/v1/tasks", json={"name": name, "examples": examples(kinds)})
    assert response.status_code == 201, response.text
    return response.json()


def classify(client: httpx.Client, task: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/v1/tasks/{task['task_id']}/classify",
                           json={"images": QUERIES, "top_k": 50, "explain": True})
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_predictions(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Same labels in the same order; probabilities and attention equal to float rounding. Under
    load a request may share its forward with others, and a forward's torch thread count follows
    its size (one thread below METANET_ONE_THREAD_BELOW_IMAGES): a different summation order,
    which moves probabilities by up to about 1e-5."""
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in expected["predictions"]]
    for mine, theirs in zip(got["predictions"], expected["predictions"], strict=True):
        assert [e["label"] for e in mine["top_k"]] == [e["label"] for e in theirs["top_k"]]
        np.testing.assert_allclose([e["probability"] for e in mine["top_k"]],
                                   [e["probability"] for e in theirs["top_k"]], atol=2e-5, rtol=0)
        np.testing.assert_allclose([w["weight"] for w in mine["attention"]],
                                   [w["weight"] for w in theirs["attention"]], atol=2e-5, rtol=0)


def listing(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get("/v1/tasks", params={"limit": 200})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_a_task_registered_through_nginx_classifies_identically_on_each_replica(cluster: Cluster) -> None:
    with cluster.lb() as lb:
        task = register(lb, ("circle", "cross", "triangle"))
    results = []
    for replica in cluster.replicas:  # one holds the memory it registered, the other rebuilds it
        with replica.client() as client:
            assert client.get(f"/v1/tasks/{task['task_id']}").json() == task
            results.append(classify(client, task))
    assert_same_predictions(results[1], results[0])
    assert [p["label"] for p in results[0]["predictions"]] == ["circle", "cross", "triangle"]


def test_examples_added_on_one_replica_are_used_by_the_other(cluster: Cluster) -> None:
    a, b = cluster.replicas
    with a.client() as on_a, b.client() as on_b:
        task = register(on_a, ("circle", "cross"))
        classify(on_b, task)  # b now caches the 2-way memory
        response = on_a.post(f"/v1/tasks/{task['task_id']}/examples",
                             json={"examples": examples(("triangle",))})
        assert response.status_code == 200, response.text
        grown = response.json()
        assert on_b.get(f"/v1/tasks/{task['task_id']}").json() == grown
        from_b = classify(on_b, grown)
        assert_same_predictions(from_b, classify(on_a, grown))
        assert {e["label"] for e in from_b["predictions"][0]["top_k"]} == {"circle", "cross", "triangle"}
        assert len(from_b["predictions"][0]["attention"]) == 3  # the memory b rebuilt has 3 examples


def test_a_task_deleted_on_one_replica_is_not_found_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.replicas
    with a.client() as on_a, b.client() as on_b, cluster.lb() as lb:
        task = register(lb, ("square", "zigzag"))
        task_id = task["task_id"]
        classify(on_a, task)
        classify(on_b, task)  # both replicas cache its memory
        assert on_a.delete(f"/v1/tasks/{task_id}").status_code == 204
        assert_error(on_b.get(f"/v1/tasks/{task_id}"), 404, "task_not_found")
        assert_error(on_b.post(f"/v1/tasks/{task_id}/classify", json={"images": QUERIES[:1]}), 404,
                     "task_not_found")
        assert_error(on_b.delete(f"/v1/tasks/{task_id}"), 404, "task_not_found")
        assert_error(lb.get(f"/v1/tasks/{task_id}"), 404, "task_not_found")
        assert task_id not in {t["task_id"] for t in listing(on_b)}


def test_nginx_sends_every_request_for_one_task_to_one_replica(cluster: Cluster) -> None:
    task_ids = [uuid.uuid4().hex for _ in range(40)]
    with cluster.lb() as lb:
        for task_id in task_ids * 2:
            assert_error(lb.get(f"/v1/tasks/{task_id}"), 404)  # routed by id all the same
    served_by = [cluster.nginx.upstream_of(f"/v1/tasks/{task_id}") for task_id in task_ids]
    assert all(len(replicas) == 1 for replicas in served_by), served_by
    assert set().union(*served_by) == {f"127.0.0.1:{r.port}" for r in cluster.replicas}


def test_a_redis_restart_keeps_every_task(cluster: Cluster) -> None:
    with cluster.lb() as lb:
        register(lb, ("bar", "circle", "zigzag"))
        before = listing(lb)
        predictions = {t["task_id"]: classify(lb, t) for t in before}

    cluster.redis.kill()  # kill -9: only what Redis had fsynced survives (appendfsync always)
    with cluster.replicas[0].client() as client:
        error = assert_error(client.get(f"/v1/tasks/{before[0]['task_id']}"), 503, "not_ready")
        assert "task store" in error["message"]
        assert client.get("/readyz").status_code == 503
    cluster.redis.start()

    for replica in cluster.replicas:
        replica.wait_ready(timeout=30)
        with replica.client() as client:
            assert listing(client) == before
    with cluster.lb() as lb:
        for task in before:
            assert_same_predictions(classify(lb, task), predictions[task["task_id"]])


def test_kill_9_of_a_replica_under_classify_load_through_nginx_loses_no_task(cluster: Cluster) -> None:
    victim, survivor = cluster.replicas
    victim_address = f"127.0.0.1:{victim.port}"
    with cluster.lb() as lb:
        for i in range(6):
            register(lb, (GLYPHS[i], GLYPHS[(i + 1) % len(GLYPHS)]), name=f"load-{i}")
        tasks = listing(lb)
        expected = {t["task_id"]: classify(lb, t) for t in tasks}
    on_victim = [t for t in tasks if cluster.nginx.upstream_of(f"/v1/tasks/{t['task_id']}/classify")
                 == {victim_address}]
    assert on_victim and len(on_victim) < len(tasks), "nginx should spread the tasks over both replicas"

    results: list[tuple[float, str, int, Any]] = []  # (started, task_id, status, body)
    stop = threading.Event()

    def load(worker: int) -> None:
        with cluster.lb() as lb:
            i = worker
            while not stop.is_set():
                task = tasks[i % len(tasks)]
                i += 2
                started = time.monotonic()
                try:
                    response = lb.post(f"/v1/tasks/{task['task_id']}/classify",
                                       json={"images": QUERIES, "top_k": 50, "explain": True})
                    results.append((started, task["task_id"], response.status_code, response.json()))
                except httpx.HTTPError as exc:
                    results.append((started, task["task_id"], 0, repr(exc)))

    workers = [threading.Thread(target=load, args=(w,)) for w in range(2)]
    for worker in workers:
        worker.start()
    try:
        _wait_until(lambda: len(results) >= 6)
        victim.kill()
        killed_at = time.monotonic()
        _wait_until(lambda: sum(started > killed_at for started, *_ in results) >= 2 * len(tasks))
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)

    # nginx marks the victim down at its first failed connection; a classify in flight on it is
    # resent to the survivor (classify only reads). So: every request succeeded, with the answer
    # the task gave before the kill, the victim's tasks rebuilt on the survivor from the store.
    failures = [(round(started - killed_at, 2), status, body) for started, _, status, body in results
                if status != 200]
    assert failures == [], failures
    for _, task_id, _, body in results:
        assert_same_predictions(body, expected[task_id])
    served_after = {task_id for started, task_id, *_ in results if started > killed_at}
    assert {t["task_id"] for t in on_victim} <= served_after

    with cluster.lb() as lb:
        assert listing(lb) == tasks  # no task lost with the replica
    with survivor.client() as client:
        for task in tasks:
            assert_same_predictions(classify(client, task), expected[task["task_id"]])


def _wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
