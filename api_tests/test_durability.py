"""Tasks acknowledged with 201 survive a clean stop and a kill -9, and predict the same after.

The SQLite file is opened directly only once the server is dead (its path is part of the data
directory's documented layout), to run PRAGMA integrity_check.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from api_tests.helpers import GLYPHS, QUERIES, Server, as_matrix, examples, png, probabilities

BURST = 10


def support_for(i: int) -> list[dict[str, Any]]:
    """A distinct small support set per burst task (different drawings, so different memories)."""
    kinds = (GLYPHS[i % len(GLYPHS)], GLYPHS[(i + 1) % len(GLYPHS)])
    return [{"label": kind, "image": png(kind, shift=(i, -i))} for kind in kinds] + [
        {"label": kinds[0], "image": png(kinds[0], shift=(-i, i))}
    ]


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


def test_kill_9_during_a_burst_loses_no_acknowledged_task_and_leaves_no_half_task(tmp_data: Path) -> None:
    server = Server(tmp_data).start()
    acknowledged: dict[str, dict[str, Any]] = {}  # name -> task record from the 201
    sent: dict[str, list[dict[str, Any]]] = {}
    first_ack = threading.Event()

    def register(i: int) -> None:
        name = f"burst-{i}"
        sent[name] = support_for(i)
        try:
            with server.client() as client:
                response = client.post("/v1/tasks", json={"name": name, "examples": sent[name]})
        except httpx.TransportError:
            return  # the server died under us: not acknowledged
        if response.status_code == 201:
            acknowledged[name] = response.json()
            first_ack.set()

    try:
        with ThreadPoolExecutor(BURST) as pool:
            for i in range(BURST):
                pool.submit(register, i)
            assert first_ack.wait(120), server.log_tail()
            time.sleep(0.2)  # let more be in flight: decoding, in the model, committing
            server.kill()
        assert 0 < len(acknowledged) < BURST, "the kill should land mid-burst"
        assert integrity(server.database) == "ok"

        server.start()
        with server.client() as client:
            tasks = {t["name"]: t for t in listing(client)}
            for name, record in acknowledged.items():
                assert tasks[name] == record
            for name, task in tasks.items():  # every listed task is whole, acknowledged or not
                support = sent[name]
                assert task["n_examples"] == len(support)
                assert task["labels"] == list(dict.fromkeys(e["label"] for e in support))
                np.testing.assert_allclose(
                    probabilities(client, task["task_id"]), one_off(client, support, task["labels"]),
                    atol=1e-6, rtol=0,
                )
    finally:
        server.stop()
    assert integrity(server.database) == "ok"
