"""Tasks acknowledged with 201 survive a clean stop and a kill -9 in the middle of 50 concurrent
registrations, and predict the same after; no task is ever half-made.

The SQLite file is opened directly only once the server is dead (its path is part of the data
directory's documented layout), to run PRAGMA integrity_check.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests.helpers import (
    GLYPHS,
    QUERIES,
    Server,
    as_matrix,
    b64,
    encode,
    examples,
    glyph,
    probabilities,
)

BURST = 50


def listing(client: httpx.Client) -> list[dict[str, Any]]:
    return client.get("/v1/tasks", params={"limit": 200}).json()["data"]


def one_off(client: httpx.Client, support: list[dict[str, Any]], labels: list[str]) -> np.ndarray:
    response = client.post("/v1/classify", json={"support": support, "images": QUERIES, "top_k": 50})
    assert response.status_code == 200, response.text
    return as_matrix(response.json()["predictions"], labels)


def integrity(database: Path) -> str:
    db = sqlite3.connect(database)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def test_tasks_survive_a_clean_stop_with_identical_predictions(tmp_data: Path) -> None:
    server = Server(tmp_data).start()
    try:
        with server.client() as client:
            for kinds in (("circle", "cross", "triangle"), ("square", "bar")):
                assert client.post("/v1/tasks", json={"examples": examples(kinds)}).status_code == 201
            before = listing(client)
            predictions = {t["task_id"]: probabilities(client, t["task_id"]) for t in before}
        # SIGTERM: uvicorn shuts down gracefully, then re-raises the signal as its exit status.
        assert server.stop() in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log_tail(), server.log_tail()

        server.start()
        assert set(server.statuses_before_ready) <= {503}  # loading: 503, never another answer
        with server.client() as client:
            assert listing(client) == before
            for task_id, expected in predictions.items():
                np.testing.assert_allclose(probabilities(client, task_id), expected, atol=1e-6, rtol=0)
    finally:
        server.stop()


def support_for(i: int) -> list[dict[str, Any]]:
    """A distinct 3-example support set of 28x28 PNGs: cheap enough for 50 at once."""
    kinds = (GLYPHS[i % len(GLYPHS)], GLYPHS[(i + 1) % len(GLYPHS)])
    shifts = ((i % 5 - 2, (i // 5) % 5 - 2), ((i // 5) % 5 - 2, 2 - i % 5), (1 - i % 3, i % 3 - 1))
    drawn = (kinds[0], kinds[1], kinds[0])
    return [{"label": kind, "image": b64(encode(glyph(kind, size=28, stroke=2, shift=shift)))}
            for kind, shift in zip(drawn, shifts, strict=True)]


@pytest.mark.slow
def test_kill_9_during_50_concurrent_registrations_loses_no_acknowledged_task_and_leaves_no_half_task(
    tmp_data: Path,
) -> None:
    server = Server(tmp_data, max_pending=2 * BURST).start()  # all 50 admitted: none gets a 429
    acknowledged: dict[str, dict[str, Any]] = {}  # name -> task record from the 201
    before_kill: dict[str, np.ndarray] = {}  # name -> probabilities, for tasks classified in time
    sent = {f"burst-{i}": support_for(i) for i in range(BURST)}
    enough_acks = threading.Event()
    lock = threading.Lock()

    def register(name: str) -> None:
        try:
            with server.client() as client:
                response = client.post("/v1/tasks", json={"name": name, "examples": sent[name]})
                if response.status_code != 201:
                    return
                with lock:
                    acknowledged[name] = response.json()
                    if len(acknowledged) >= BURST // 5:
                        enough_acks.set()
                record = response.json()
                classified = client.post(f"/v1/tasks/{record['task_id']}/classify",
                                         json={"images": QUERIES, "top_k": 50})
                if classified.status_code == 200:
                    before_kill[name] = as_matrix(classified.json()["predictions"], record["labels"])
        except httpx.TransportError:
            return  # the server died under us: whatever was in flight is not acknowledged

    try:
        with ThreadPoolExecutor(BURST) as pool:
            for name in sent:
                pool.submit(register, name)
            assert enough_acks.wait(180), server.log_tail()
            server.kill()
        assert 0 < len(acknowledged) < BURST, f"the kill should land mid-burst ({len(acknowledged)} acks)"
        assert integrity(server.database) == "ok"

        server.start()
        with server.client() as client:
            tasks = {t["name"]: t for t in listing(client)}
            assert set(acknowledged) <= set(tasks), "an acknowledged task was lost"
            for name, record in acknowledged.items():
                assert tasks[name] == record
                if name in before_kill:  # classifies exactly as it did before the crash
                    np.testing.assert_allclose(probabilities(client, record["task_id"]), before_kill[name],
                                               atol=1e-6, rtol=0)
            for name, task in tasks.items():  # every listed task is whole, acknowledged or not
                support = sent[name]
                assert task["n_examples"] == len(support)
                assert task["labels"] == list(dict.fromkeys(e["label"] for e in support))
                assert task["shots"] == {label: [e["label"] for e in support].count(label)
                                         for label in task["labels"]}
                np.testing.assert_allclose(
                    probabilities(client, task["task_id"]), one_off(client, support, task["labels"]),
                    atol=1e-6, rtol=0,
                )
    finally:
        server.stop()
    assert integrity(server.database) == "ok"
