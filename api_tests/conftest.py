"""One real server for the whole test run (smallish limits so the limits can be hit), and a client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests.helpers import KiB, Server, examples, probabilities

# Small enough to exceed cheaply, large enough for a 20000x20000 PNG bomb (~100 KiB of base64)
# and for a 20-way Omniglot task; a cache that holds only a few tasks, so rebuilds happen.
SERVER_SETTINGS = {
    "max_body_bytes": 512 * KiB,
    "max_examples": 24,
    "max_images_per_request": 64,
    "cache_bytes": 8_000_000,
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("server") / "data", **SERVER_SETTINGS)
    try:
        server.start()
        yield server
    finally:
        if server.process is not None:
            server.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


class Sentinel:
    """Tasks registered once; every rejected request must leave them (and the list) as they were."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.tasks: list[dict[str, Any]] = []
        for kinds in (("circle", "cross", "triangle"), ("square", "zigzag")):
            response = client.post("/v1/tasks", json={"name": "sentinel", "examples": examples(kinds)})
            assert response.status_code == 201, response.text
            self.tasks.append(response.json())
        self.predictions = [probabilities(client, t["task_id"]) for t in self.tasks]

    def listing(self) -> list[dict[str, Any]]:
        tasks, cursor = [], None
        while True:
            params = {"limit": 200, **({"cursor": cursor} if cursor else {})}
            page = self.client.get("/v1/tasks", params=params).json()
            tasks += page["data"]
            if (cursor := page["next_cursor"]) is None:
                return tasks

    def assert_unchanged(self, listing_before: list[dict[str, Any]]) -> None:
        assert self.listing() == listing_before
        for task, before in zip(self.tasks, self.predictions, strict=True):
            assert self.client.get(f"/v1/tasks/{task['task_id']}").json() == task
            np.testing.assert_allclose(probabilities(self.client, task["task_id"]), before, atol=1e-6, rtol=0)


@pytest.fixture(scope="session")
def sentinel(client: httpx.Client) -> Sentinel:
    return Sentinel(client)


@pytest.fixture
def tmp_data(tmp_path: Path) -> Path:
    return tmp_path / "data"
