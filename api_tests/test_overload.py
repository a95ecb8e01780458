"""Overload mode (METANET_OVERLOAD_DEMAND, METANET_OVERLOAD_FORWARD_FACTOR; service/inference/batcher.py)
and the keep-alive that outlives a Retry-After, against a real server.

A crowd of clients that never wait pushes one server process past its demand bound: it says so on
/metrics, runs one-image forwards, answers only 200 or 429 (with a Retry-After of 1 to 10 s) and
right predictions, and leaves overload once the crowd is gone.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api_tests.helpers import GLYPHS, Server, examples, metrics, png, running

KINDS = list(GLYPHS)
QUERY = [png(KINDS[0], shift=(2, -1), stroke=5)]
CROWD = 40
RETRY_AFTER_MAX_S = 10  # the longest Retry-After of a full model queue (docs/operations.md, Overload)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # One process, forwards of up to 16 images; overloaded past a demand of 8 requests, and then
    # forwards of one image (a factor of 1: no more than a one-image request's own compute).
    yield from running(Server(tmp_path_factory.mktemp("overload") / "data", batch_max_images=16,
                              overload_demand=8, overload_forward_factor=1, keep_alive_s=2))


def test_a_crowd_past_the_demand_bound_gets_one_image_forwards_and_only_200_or_429(server: Server) -> None:
    with server.client() as client:
        task = client.post("/v1/tasks", json={"examples": examples(KINDS)}).json()
        path = f"/v1/tasks/{task['task_id']}/classify"
        want = client.post(path, json={"images": QUERY}).json()["predictions"]
        assert metrics(client)["metanet_overloaded"] == 0
        stop = threading.Event()
        answers: list[tuple[int, str, dict]] = []

        def crowd_member() -> None:  # posts back to back, ignoring Retry-After
            with server.client() as own:
                while not stop.is_set():
                    r = own.post(path, json={"images": QUERY})
                    answers.append((r.status_code, r.headers.get("retry-after", ""), r.json()))

        with ThreadPoolExecutor(CROWD) as pool:
            members = [pool.submit(crowd_member) for _ in range(CROWD)]
            try:
                deadline = time.monotonic() + 60
                while (before := metrics(client))["metanet_overloaded"] != 1:
                    assert time.monotonic() < deadline, "the crowd never overloaded the server"
                    time.sleep(0.05)
                time.sleep(1.0)
                during = metrics(client)
            finally:
                stop.set()
        for member in members:
            member.result()  # no member died of an exception (a cut connection, a non-JSON answer)
        assert during["metanet_overloaded"] == 1
        batches = during["metanet_batches_total"] - before["metanet_batches_total"]
        images = during["metanet_batched_images_total"] - before["metanet_batched_images_total"]
        assert batches > 0
        assert images / batches <= 1.5  # one image a forward (a batch begun before may finish late)

        statuses = [status for status, _, _ in answers]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(429) > 0 and statuses.count(200) > 0
        for status, retry_after, body in answers:
            if status == 429:
                assert body["error"]["type"] == "overloaded"
                assert 1 <= int(retry_after) <= RETRY_AFTER_MAX_S
            else:
                assert body["predictions"][0]["label"] == want[0]["label"]

        # Once the crowd is gone its refusals leave the 2 s window, and the demand with them.
        deadline = time.monotonic() + 10
        while metrics(client)["metanet_overloaded"] != 0:
            assert time.monotonic() < deadline, "the server stayed overloaded with no one asking"
            time.sleep(0.1)
        assert client.post(path, json={"images": QUERY}).status_code == 200


def test_an_idle_keep_alive_connection_stays_open_for_keep_alive_s_then_closes(server: Server) -> None:
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        for idle in (0.0, 1.0):  # within METANET_KEEP_ALIVE_S=2: the same connection answers
            time.sleep(idle)
            conn.sendall(request)
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(3.0)  # past it: the server has closed the connection
        assert conn.recv(4096) == b""
