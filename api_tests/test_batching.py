"""Cross-request batching, the bounded queue, deadlines and disconnects, seen from outside.

One server with a generous batching wait (so concurrent requests surely meet in a batch) and room
for a 100-example registration, which holds the model thread for a second or more: the tests queue
work behind it to see what happens to queued work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests.helpers import GLYPHS, Server, as_matrix, examples, metrics, png, registered, running

KINDS = list(GLYPHS)
QUERY_IMAGES = [png(kind, shift=(dx, 2), stroke=5) for kind in KINDS for dx in (-3, 3)]  # 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running(Server(tmp_path_factory.mktemp("batching") / "data", batch_max_wait_ms=25,
                              batch_max_images=64, max_examples=100, max_images_per_request=100))


@pytest.fixture(scope="module")
def task(server: Server) -> dict[str, Any]:
    return registered(server, KINDS)


def classify(client: httpx.Client, task_id: str, images: list[str], **headers: str) -> httpx.Response:
    return client.post(f"/v1/tasks/{task_id}/classify", json={"images": images, "top_k": 6},
                       headers=headers)


def big_support() -> list[dict[str, Any]]:
    """100 examples: 20 labels x 5 drawings (a registration that takes a while)."""
    return [{"label": f"{kind}-{k}", "image": png(kind, shift=(k - 2 + s, s - 2), stroke=4 + k % 3)}
            for kind in KINDS[:4] for k in range(5) for s in range(5)]


def while_busy(server: Server, action: Callable[[], Any]) -> Any:
    """Run `action` while a 100-example registration holds the model thread; returns its result."""
    with server.client() as client:
        body = {"examples": big_support()}
        holder = threading.Thread(target=lambda: client.post("/v1/tasks", json=body))
        before = metrics(client)["metanet_model_pending"]
        holder.start()
        deadline = time.monotonic() + 30
        while metrics(client)["metanet_model_pending"] <= before:
            assert time.monotonic() < deadline, "the registration never reached the model"
            time.sleep(0.005)
        try:
            return action()
        finally:
            holder.join()


def test_concurrent_requests_are_batched_and_answered_as_if_alone(server: Server, task) -> None:
    with server.client() as client:
        alone = [as_matrix(classify(client, task["task_id"], [img]).json()["predictions"], task["labels"])
                 for img in QUERY_IMAGES]
        before = metrics(client)
        with ThreadPoolExecutor(len(QUERY_IMAGES)) as pool:
            responses = list(pool.map(lambda img: classify(client, task["task_id"], [img]), QUERY_IMAGES))
        after = metrics(client)
    assert [r.status_code for r in responses] == [200] * len(QUERY_IMAGES)
    for want, response in zip(alone, responses, strict=True):
        got = as_matrix(response.json()["predictions"], task["labels"])
        np.testing.assert_allclose(got, want, atol=1e-5)
    batches = after["metanet_batches_total"] - before["metanet_batches_total"]
    images = after["metanet_batched_images_total"] - before["metanet_batched_images_total"]
    assert images == len(QUERY_IMAGES)
    assert batches < len(QUERY_IMAGES), f"{batches} forwards for {len(QUERY_IMAGES)} concurrent requests"


def test_requests_of_different_tasks_share_a_batch_and_get_their_own_answers(server: Server, task) -> None:
    with server.client() as client:
        other = client.post("/v1/tasks", json={"examples": examples(KINDS[:3])}).json()
        jobs = [(t, [img]) for t in (task, other) for img in QUERY_IMAGES[:6]]
        alone = [classify(client, t["task_id"], imgs).json()["predictions"] for t, imgs in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: classify(client, job[0]["task_id"], job[1]), jobs))
    for (t, _), want, response in zip(jobs, alone, together, strict=True):
        assert response.status_code == 200
        got = response.json()["predictions"]
        assert {e["label"] for e in got[0]["top_k"]} <= set(t["labels"])
        np.testing.assert_allclose(as_matrix(got, t["labels"]), as_matrix(want, t["labels"]), atol=1e-5)


def test_a_bad_image_queued_with_good_requests_fails_alone_with_a_422_naming_it(server: Server, task) -> None:
    """Query images are decoded on the model thread just before their batch's forward: a broken
    file must fail its own request, by name, and nothing else in the batch."""
    garbage = ["iVBORw0KGgoAAAANSUhEUgAA" + "A" * 40, "not base64 at all!", png(KINDS[0])[:60]]
    with server.client() as client:
        alone = [as_matrix(classify(client, task["task_id"], [img]).json()["predictions"], task["labels"])
                 for img in QUERY_IMAGES[:6]]

        def mixed() -> list[httpx.Response]:
            with ThreadPoolExecutor(9) as pool:
                good = [pool.submit(classify, client, task["task_id"], [img]) for img in QUERY_IMAGES[:6]]
                bad = [pool.submit(classify, client, task["task_id"], [QUERY_IMAGES[0], junk])
                       for junk in garbage]
                return [f.result() for f in good + bad]

        responses = while_busy(server, mixed)
    for want, response in zip(alone, responses[:6], strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(as_matrix(response.json()["predictions"], task["labels"]), want, atol=1e-5)
    for response in responses[6:]:
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] in ("invalid_image", "image_too_large"), error
        assert error["details"]["field"] == "images[1]", error


def test_a_request_whose_deadline_passes_in_the_queue_gets_504_and_is_not_computed(server, task) -> None:
    def late() -> httpx.Response:
        with server.client() as client:
            return classify(client, task["task_id"], QUERY_IMAGES[:1], **{"X-Request-Timeout-Ms": "50"})

    with server.client() as client:
        before = metrics(client)
        response = while_busy(server, late)
        after = metrics(client)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "deadline_exceeded"
    assert after["metanet_batched_images_total"] == before["metanet_batched_images_total"]
    dropped = sum(after[k] - before.get(k, 0) for k in after if k.startswith("metanet_dropped_total"))
    assert dropped == 1


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1e400", "nan", "3600001"])
def test_a_bad_timeout_header_is_refused_with_422_naming_it(client_of, task, value: str) -> None:
    response = classify(client_of, task["task_id"], QUERY_IMAGES[:1], **{"X-Request-Timeout-Ms": value})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_input" and "X-Request-Timeout-Ms" in error["message"]


@pytest.fixture
def client_of(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def test_work_of_clients_that_hung_up_is_dropped_before_compute(server: Server, task) -> None:
    def hang_up() -> list[str]:
        outcomes = []
        for _ in range(3):
            with httpx.Client(base_url=server.url, timeout=0.3) as impatient:
                try:
                    classify(impatient, task["task_id"], QUERY_IMAGES[:2])
                    outcomes.append("answered")
                except httpx.TimeoutException:
                    outcomes.append("hung up")
        return outcomes

    with server.client() as client:
        before = metrics(client)
        outcomes = while_busy(server, hang_up)
        time.sleep(0.5)  # the dispatcher looks at the dropped requests once the registration is done
        after = metrics(client)
    assert outcomes == ["hung up"] * 3
    key = 'metanet_dropped_total{reason="disconnected"}'
    assert after[key] - before.get(key, 0) == 3
    assert after["metanet_batched_images_total"] == before["metanet_batched_images_total"]


def test_past_the_queue_bound_requests_get_429_with_retry_after_and_never_5xx(tmp_path) -> None:
    server = Server(tmp_path / "data", max_pending=4, max_queue_images=4, batch_max_images=2)
    try:
        server.start()
        with server.client() as client:
            created = client.post("/v1/tasks", json={"examples": examples(KINDS)}).json()
            want = classify(client, created["task_id"], QUERY_IMAGES[:1]).json()["predictions"]
            with ThreadPoolExecutor(40) as pool:
                responses = list(pool.map(
                    lambda _: classify(client, created["task_id"], QUERY_IMAGES[:1]), range(120)))
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 429}, statuses
            assert statuses.count(429) > 0 and statuses.count(200) > 0
            for response in responses:
                if response.status_code == 429:
                    assert response.json()["error"]["type"] == "overloaded"
                    assert int(response.headers["Retry-After"]) >= 1
                else:
                    got = response.json()["predictions"]
                    assert got[0]["label"] == want[0]["label"]
            assert metrics(client)["metanet_rejected_total"] == statuses.count(429)
            assert classify(client, created["task_id"], QUERY_IMAGES[:1]).status_code == 200
    finally:
        server.stop()


def test_with_a_queue_wait_bound_a_request_behind_too_much_work_gets_429_naming_the_wait(tmp_path) -> None:
    """METANET_MAX_QUEUE_WAIT_MS (here with no allowance in proportion to the request): 32-image
    requests sent together cannot all wait behind each other; the refused ones get a 429 that
    says how much work was ahead, the admitted ones their right answers."""
    server = Server(tmp_path / "data", max_queue_wait_ms=1, max_queue_wait_factor=0, batch_max_images=32)
    images = (QUERY_IMAGES * 4)[:32]
    try:
        server.start()
        with server.client() as client:
            created = client.post("/v1/tasks", json={"examples": examples(KINDS)}).json()
            want = classify(client, created["task_id"], images).json()["predictions"]  # a batch's cost
            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(lambda _: classify(client, created["task_id"], images), range(16)))
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 429}, statuses
            assert statuses.count(200) > 0 and statuses.count(429) > 0, statuses
            for response in responses:
                if response.status_code == 429:
                    error = response.json()["error"]
                    assert error["type"] == "overloaded"
                    assert "ms of work queued ahead" in error["message"]
                    assert int(response.headers["Retry-After"]) >= 1
                else:
                    assert [p["label"] for p in response.json()["predictions"]] == [p["label"] for p in want]
    finally:
        server.stop()


def test_a_large_request_queues_behind_work_a_one_image_request_may_not_wait_for(tmp_path) -> None:
    """The time bound's allowance grows with a request's own compute (5 ms + 2 x it by default):
    while a 100-image request runs in forwards of 4, a one-image request gets 429 naming the
    wait, and a second 100-image request, which may wait about twice its own compute, is admitted
    and answered, rather than refused by the check made before a body is read, which knows no
    size (it once judged every request as one image)."""
    server = Server(tmp_path / "data", batch_max_images=4, max_images_per_request=100)
    images = (QUERY_IMAGES * 9)[:100]
    try:
        server.start()
        with server.client() as client:
            created = client.post("/v1/tasks", json={"examples": examples(KINDS)}).json()
            want = classify(client, created["task_id"], images).json()["predictions"]  # the cost line

            def busy() -> tuple[httpx.Response, httpx.Response]:
                with server.client() as own:
                    return (classify(own, created["task_id"], QUERY_IMAGES[:1]),
                            classify(own, created["task_id"], images))

            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(classify, client, created["task_id"], images)
                deadline = time.monotonic() + 30
                while metrics(client)["metanet_batches_total"] < 26:  # the first forward of 4 ran
                    assert time.monotonic() < deadline and not first.done(), "the request never ran"
                    time.sleep(0.002)
                small, large = pool.submit(busy).result()
                assert first.result().status_code == 200
    finally:
        server.stop()
    assert small.status_code == 429, small.text
    assert "ms of work queued ahead" in small.json()["error"]["message"]
    assert large.status_code == 200, large.text
    assert [p["label"] for p in large.json()["predictions"]] == [p["label"] for p in want]


def test_two_model_workers_and_worker_decoding_answer_as_one_model_thread(server, task, tmp_path) -> None:
    """METANET_MODEL_WORKERS=2 runs batches side by side on one torch thread each, and
    METANET_QUERY_DECODE=workers (what a GPU server picks by itself) decodes requests in parallel
    worker threads: same answers as the default server, registrations in between, and a broken
    image still fails its own request with a 422 naming it while the good ones beside it succeed."""
    # Batches of 2 make every request past the first four wait behind others: the queue's time
    # bound, or overload mode (past 1.5 x 2 x 2 = 6 pending), neither what this test is about,
    # could refuse some of them.
    workers = Server(tmp_path / "data", query_decode="workers", model_workers=2, batch_max_images=2,
                     max_queue_wait_ms=0, max_queue_wait_factor=0, overload_forward_factor=0)
    try:
        workers.start()
        with server.client() as client:
            want = classify(client, task["task_id"], QUERY_IMAGES).json()["predictions"]
        with workers.client() as client:
            created = client.post("/v1/tasks", json={"examples": examples(KINDS)}).json()
            assert created["labels"] == task["labels"]
            with ThreadPoolExecutor(8) as pool:
                good = [pool.submit(classify, client, created["task_id"], [img]) for img in QUERY_IMAGES]
                bad = pool.submit(classify, client, created["task_id"], [QUERY_IMAGES[0], "not base64!"])
                again = pool.submit(client.post, "/v1/tasks", json={"examples": examples(KINDS)})
                responses = [f.result() for f in good]
                broken = bad.result()
                assert again.result().status_code == 201
            batches = metrics(client)["metanet_batches_total"]
    finally:
        workers.stop()
    assert [r.status_code for r in responses] == [200] * len(QUERY_IMAGES)
    got = [r.json()["predictions"][0] for r in responses]
    np.testing.assert_allclose(as_matrix(got, task["labels"]), as_matrix(want, task["labels"]), atol=1e-5)
    assert batches >= len(QUERY_IMAGES) // 2  # batches of at most 2 images
    assert broken.status_code == 422, broken.text
    assert broken.json()["error"]["details"]["field"] == "images[1]"


def test_a_request_larger_than_a_batch_runs_in_parts_answering_as_one_forward(server, task, tmp_path) -> None:
    """METANET_BATCH_MAX_IMAGES bounds every forward: 12 images with batches of 5 run as three
    forwards of 4 (on two model workers, side by side), and the answer is that of one forward of
    12, attention included; a broken image in any part fails the request naming its own index."""
    body = {"images": QUERY_IMAGES, "top_k": 6, "explain": True}
    with server.client() as client:
        want = client.post(f"/v1/tasks/{task['task_id']}/classify", json=body).json()["predictions"]
    parts = Server(tmp_path / "data", model_workers=2, batch_max_images=5)
    try:
        parts.start()
        with parts.client() as client:
            created = client.post("/v1/tasks", json={"examples": examples(KINDS)}).json()
            before = metrics(client)
            response = client.post(f"/v1/tasks/{created['task_id']}/classify", json=body)
            after = metrics(client)
            broken = {}
            for index in (2, 9):
                images = list(QUERY_IMAGES)
                images[index] = "not base64!"
                broken[index] = client.post(f"/v1/tasks/{created['task_id']}/classify",
                                            json={"images": images})
            again = client.post(f"/v1/tasks/{created['task_id']}/classify", json=body)
    finally:
        parts.stop()
    assert response.status_code == 200, response.text
    assert again.json() == response.json()
    got = response.json()["predictions"]
    np.testing.assert_allclose(as_matrix(got, task["labels"]), as_matrix(want, task["labels"]), atol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert [a["example_index"] for a in g["attention"]] == [a["example_index"] for a in w["attention"]]
        weights = [[a["weight"] for a in p["attention"]] for p in (g, w)]
        np.testing.assert_allclose(*weights, atol=1e-5)
    assert after["metanet_batches_total"] - before["metanet_batches_total"] == 3
    assert after["metanet_batched_images_total"] - before["metanet_batched_images_total"] == 12
    for index, refused in broken.items():
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["details"]["field"] == f"images[{index}]"


@pytest.fixture(scope="module")
def lingering(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose free model lingers a long 300 ms for the clients of its last forward."""
    yield from running(Server(tmp_path_factory.mktemp("lingering") / "data", batch_linger_ms=300,
                              batch_max_images=64))


def test_looping_clients_share_forwards_by_lingering_and_a_lone_client_never_waits(lingering) -> None:
    task = registered(lingering, KINDS)
    with lingering.client() as client:
        alone = [as_matrix(classify(client, task["task_id"], [img]).json()["predictions"], task["labels"])
                 for img in QUERY_IMAGES[:4]]
        before = metrics(client)
        start = time.monotonic()
        for img in QUERY_IMAGES[:4] * 3:  # one client, one request after another: nothing to wait for
            assert classify(client, task["task_id"], [img]).status_code == 200
        lone_seconds = time.monotonic() - start
        after_lone = metrics(client)

        def loop(img: str) -> list[np.ndarray]:
            with lingering.client() as own:  # each client on its own connection, as callers are
                return [as_matrix(classify(own, task["task_id"], [img]).json()["predictions"], task["labels"])
                        for _ in range(5)]

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(loop, QUERY_IMAGES[:4]))
        after_loops = metrics(client)
    assert after_lone["metanet_lingers_total"] == before["metanet_lingers_total"]
    assert lone_seconds < 12 * 0.3  # had each request waited out the window, 3.6 s at least
    for want, got in zip(alone, answers, strict=True):
        for matrix in got:
            np.testing.assert_allclose(matrix, want, atol=1e-5)
    assert after_loops["metanet_lingers_total"] > after_lone["metanet_lingers_total"]
    assert after_loops["metanet_linger_seconds_total"] > after_lone["metanet_linger_seconds_total"]
    batches = after_loops["metanet_batches_total"] - after_lone["metanet_batches_total"]
    assert batches < 20, f"{batches} forwards for 20 requests of 4 looping clients"
