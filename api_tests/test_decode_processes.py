"""METANET_QUERY_DECODE=processes (what a GPU server picks by itself): request images are decoded
in worker processes. Same answers as decoding in the server process, bad images still refused by
field, a killed worker replaced without failing a request, and no worker left behind at shutdown.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests.helpers import (
    GLYPHS,
    Server,
    as_matrix,
    assert_error,
    b64,
    bomb_png,
    examples,
    png,
    registered,
    running,
)

KINDS = list(GLYPHS)
QUERIES = [png(kind, shift=(dx, 2), stroke=5) for kind in KINDS for dx in (-3, 3)]  # 12: to the processes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running(Server(tmp_path_factory.mktemp("decode-processes") / "data", query_decode="processes",
                              decode_processes=2, max_image_pixels=1_000_000))


@pytest.fixture(scope="module")
def task(server: Server) -> dict[str, Any]:
    return registered(server, KINDS)  # 6 examples: decoded in the processes


def decoders(server: Server) -> list[int]:
    """The pids of the server's decoding processes (multiprocessing's spawned children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == server.pid and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def classify(client: httpx.Client, task_id: str, images: list[str]) -> httpx.Response:
    return client.post(f"/v1/tasks/{task_id}/classify", json={"images": images, "top_k": 6})


def test_processes_answer_as_decoding_in_the_server(server: Server, task: dict[str, Any]) -> None:
    assert len(decoders(server)) == 2
    with server.client() as client:
        together = classify(client, task["task_id"], QUERIES)
        assert together.status_code == 200, together.text
        # One image at a time is decoded on the event loop, in the server process.
        alone = [classify(client, task["task_id"], [image]) for image in QUERIES]
    assert [r.status_code for r in alone] == [200] * len(QUERIES)
    got = as_matrix(together.json()["predictions"], task["labels"])
    want = as_matrix([r.json()["predictions"][0] for r in alone], task["labels"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [p["label"] for p in together.json()["predictions"]] == [k for k in KINDS for _ in (-3, 3)]


def test_bad_images_are_refused_by_field_from_the_processes(server: Server, task: dict[str, Any]) -> None:
    with server.client() as client:
        broken = classify(client, task["task_id"], [*QUERIES[:3], "bm90IGFuIGltYWdl", QUERIES[4]])
        error = assert_error(broken, 422, "invalid_image")
        assert error["details"] == {"field": "images[3]", "index": 3}, error
        bomb = classify(client, task["task_id"], [*QUERIES[:4], b64(bomb_png(2000))])
        error = assert_error(bomb, 413, "image_too_large")
        assert error["details"]["field"] == "images[4]" and "pixels" in error["message"], error
        support = [*examples(KINDS[:2]), {"label": "x", "image": "data:image/png;base64,AAAA"}]
        refused = client.post("/v1/tasks", json={"examples": support})
        error = assert_error(refused, 422, "invalid_image")
        assert error["details"]["field"] == "examples[2].image", error
        assert classify(client, task["task_id"], QUERIES).status_code == 200  # nothing broken


def test_a_killed_decoding_process_is_replaced_without_failing_a_request(
    server: Server, task: dict[str, Any]
) -> None:
    before = decoders(server)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while before[0] in decoders(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    with server.client() as client:
        responses = [classify(client, task["task_id"], QUERIES) for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3, [r.text[:200] for r in responses]
    after = decoders(server)  # a new pool starts its processes as work comes
    assert 1 <= len(after) <= 2 and before[0] not in after
    assert "a decoding process died" in server.log_path.read_text()


def test_no_decoding_process_outlives_the_server(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", query_decode="processes", decode_processes=2).start()
    try:
        pids = decoders(server)
        assert len(pids) == 2
    finally:
        assert server.stop() == -signal.SIGTERM  # a clean stop re-raises the signal (process.server.serve)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert "stopped: model released" in server.log_path.read_text()
