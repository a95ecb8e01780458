"""Graceful shutdown: SIGTERM while 20 classify requests are in flight. The server stops accepting
connections at once, answers all 20 with 200, then stops the model and closes the store cleanly.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from api_tests.helpers import GLYPHS, Server, png

IN_FLIGHT = 20
IMAGES = 128  # per request: enough model work that 20 of them queue for a while
CLASSIFY_200 = 'metanet_http_requests_total{method="POST",route="/v1/tasks/{task_id}/classify",status="200"}'


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_sigterm_lets_20_in_flight_classify_requests_finish_with_200(tmp_data: Path) -> None:
    # A queue with room for all of them: none is refused with 429.
    server = Server(tmp_data, shutdown_timeout_s=120, max_queue_images=IN_FLIGHT * IMAGES,
                    max_queue_wait_ms=0, max_queue_wait_factor=0).start()  # all of them admitted
    try:
        with server.client() as client:
            support = [{"label": k, "image": png(k, shift=(s, -s))} for k in GLYPHS[:5] for s in (0, 3)]
            response = client.post("/v1/tasks", json={"examples": support})
            assert response.status_code == 201, response.text
            task_id = response.json()["task_id"]
        images = [png(GLYPHS[i % 6], shift=(i % 7 - 3, i % 5 - 2)) for i in range(IMAGES)]

        finished_at: list[float] = []
        lock = threading.Lock()

        def classify(_: int) -> httpx.Response:
            with server.client() as own:  # one connection each, as 20 separate clients would
                response = own.post(f"/v1/tasks/{task_id}/classify", json={"images": images})
            with lock:
                finished_at.append(time.monotonic())
            return response

        with ThreadPoolExecutor(IN_FLIGHT) as pool, server.client() as probe:
            futures = [pool.submit(classify, i) for i in range(IN_FLIGHT)]
            # Wait until every request has reached the model (queued or done), then signal.
            deadline = time.monotonic() + 120
            while True:
                text = probe.get("/metrics").text
                pending, done = metric(text, "metanet_model_pending"), metric(text, CLASSIFY_200)
                if pending + done >= IN_FLIGHT or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert pending >= IN_FLIGHT // 2, f"only {pending} requests were still in flight at SIGTERM"

            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no new connections while draining
                httpx.get(f"{server.url}/healthz", timeout=5)
            responses = [f.result(timeout=300) for f in futures]

        assert [r.status_code for r in responses] == [200] * IN_FLIGHT, [r.text[:200] for r in responses]
        assert all(len(r.json()["predictions"]) == IMAGES for r in responses)
        assert sum(t > signalled for t in finished_at) >= IN_FLIGHT // 2  # they really were in flight

        assert server.process.wait(timeout=120) in (0, -signal.SIGTERM)
        log = server.log_tail(200)
        assert "stopped: model released, task store closed" in log and "Application shutdown complete" in log
        assert "Cancel" not in log  # nothing was cut off by the graceful-shutdown timeout
    finally:
        server.stop()

    # A clean close checkpoints the write-ahead log into the database and removes it.
    wal = Path(f"{server.database}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    db = sqlite3.connect(server.database)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
