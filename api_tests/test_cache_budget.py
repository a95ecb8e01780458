"""A cache of task memories that holds about 5 tasks, and 40 tasks registered: the cache-bytes
gauge never exceeds the budget, every task stays listed, and evicted tasks are rebuilt from the
store on demand with the predictions they gave at registration.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests.helpers import GLYPHS, Server, metrics, png, probabilities

# About 5 two-way one-shot tasks of the shipped weights (1.85 MB each with M in float32, fewer bytes
# with a smaller M dtype: the test checks that 40 tasks still overflow it).
CACHE_BYTES = 10_000_000
N_TASKS = 40
N_CHECKED = 5  # the earliest tasks: long evicted by the end
PAIRS = list(itertools.combinations(GLYPHS, 2))  # 15 pairs; with 3 shifts, 45 distinct tasks


def support(t: int) -> list[dict[str, str]]:
    shift = (2 * (t // len(PAIRS)) - 2, 0)
    return [{"label": kind, "image": png(kind, shift=shift)} for kind in PAIRS[t % len(PAIRS)]]


def queries(t: int) -> list[str]:
    """Another drawing of each of the task's glyphs."""
    return [png(kind, shift=(3, -3), stroke=5) for kind in PAIRS[t % len(PAIRS)]]


@dataclass
class Registered:
    client: httpx.Client
    tasks: list[dict[str, Any]] = field(default_factory=list)  # the 201 bodies, in order
    cache_bytes: list[float] = field(default_factory=list)  # the gauge after each registration
    predictions: list[np.ndarray] = field(default_factory=list)  # of the first N_CHECKED, at registration
    after: dict[str, float] = field(default_factory=dict)  # /metrics once all are registered


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registered]:
    server = Server(tmp_path_factory.mktemp("cache-budget") / "data", cache_bytes=CACHE_BYTES)
    try:
        server.start()
        with server.client() as client:
            state = Registered(client)
            for t in range(N_TASKS):
                response = client.post("/v1/tasks", json={"name": f"cache-{t}", "examples": support(t)})
                assert response.status_code == 201, response.text
                state.tasks.append(response.json())
                if t < N_CHECKED:
                    state.predictions.append(probabilities(client, state.tasks[t]["task_id"], queries(t)))
                state.cache_bytes.append(metrics(client)["metanet_cache_bytes"])
            state.after = metrics(client)
            yield state
    finally:
        if server.process is not None:
            server.stop()


def test_the_tasks_overflow_the_cache_so_some_are_evicted(registered: Registered) -> None:
    memory_bytes = [task["memory_bytes"] for task in registered.tasks]
    assert all(isinstance(n, int) and n > 0 for n in memory_bytes)
    assert registered.after["metanet_cache_budget_bytes"] == CACHE_BYTES
    assert sum(memory_bytes) > 2 * CACHE_BYTES, "the budget holds too many tasks for this test to mean much"
    assert max(memory_bytes) <= CACHE_BYTES, "not even one task fits: nothing would be cached"
    assert registered.after["metanet_cache_evictions_total"] > 0
    assert registered.after["metanet_cache_entries"] < N_TASKS


def test_cache_bytes_never_exceed_the_budget_after_any_registration(registered: Registered) -> None:
    assert len(registered.cache_bytes) == N_TASKS
    assert max(registered.cache_bytes) <= CACHE_BYTES, registered.cache_bytes
    assert registered.cache_bytes[-1] > 0


def test_every_registered_task_is_listed_and_counted(registered: Registered) -> None:
    ids, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        page = registered.client.get("/v1/tasks", params=params).json()
        ids += [task["task_id"] for task in page["data"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert ids == [task["task_id"] for task in registered.tasks]
    assert registered.after["metanet_tasks"] == N_TASKS


def test_evicted_tasks_are_rebuilt_on_demand_with_the_predictions_they_gave_at_registration(
    registered: Registered,
) -> None:
    client = registered.client
    for t, before in enumerate(registered.predictions):
        misses = metrics(client)["metanet_cache_misses_total"]
        rebuilt = probabilities(client, registered.tasks[t]["task_id"], queries(t))
        assert metrics(client)["metanet_cache_misses_total"] > misses, f"task {t} was still cached"
        np.testing.assert_allclose(rebuilt, before, atol=1e-6, rtol=0)
        assert (rebuilt.argmax(1) == before.argmax(1)).all()
        assert metrics(client)["metanet_cache_bytes"] <= CACHE_BYTES

