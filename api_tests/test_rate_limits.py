"""Per-key rate limits: a token bucket per API key, answered with 429 rate_limited and Retry-After.

The server allows bursts of 3 and one request every 2 s after that; each test uses its own key, so
the buckets start full.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from api_tests.helpers import Server, assert_error, examples

KEYS = ("k-first-0a1b", "k-second-2c3d", "k-third-4e5f", "k-fourth-6a7b")
BURST, PER_SECOND = 3, 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("limited") / "data", api_keys=",".join(KEYS),
                    rate_limit_per_s=PER_SECOND, rate_limit_burst=BURST)
    try:
        yield server.start()
    finally:
        server.stop()


def test_a_key_past_its_burst_gets_429_rate_limited_with_retry_after(server: Server) -> None:
    with server.as_user(KEYS[0]) as client:
        assert [client.get("/v1/model").status_code for _ in range(BURST)] == [200] * BURST
        response = client.get("/v1/model")
        assert_error(response, 429, "rate_limited")
        assert 1 <= int(response.headers["retry-after"]) <= 1 / PER_SECOND
        assert response.headers["x-request-id"]

        time.sleep(int(response.headers["retry-after"]) + 0.1)  # waiting as told is enough
        assert client.get("/v1/model").status_code == 200


def test_each_key_has_its_own_bucket(server: Server) -> None:
    with server.as_user(KEYS[1]) as greedy, server.as_user(KEYS[2]) as other:
        while greedy.get("/v1/tasks").status_code != 429:
            pass
        assert [other.get("/v1/tasks").status_code for _ in range(BURST)] == [200] * BURST


def test_a_rate_limited_request_changes_nothing_and_probes_are_never_limited(server: Server) -> None:
    with server.as_user(KEYS[3]) as client:
        body = {"examples": examples(("circle", "bar"))}
        first = client.post("/v1/tasks", json={"name": "kept", **body})
        assert first.status_code == 201, first.text
        while client.get("/v1/model").status_code != 429:
            pass
        refused = client.post("/v1/tasks", json={"name": "refused", **body})
        assert_error(refused, 429, "rate_limited")
        for path in ("/healthz", "/readyz", "/metrics"):
            assert all(client.get(path).status_code == 200 for _ in range(10)), path

        time.sleep(int(refused.headers["retry-after"]) + 0.1)
        assert [t["name"] for t in client.get("/v1/tasks").json()["data"]] == ["kept"]
