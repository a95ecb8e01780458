"""METANET_BACKEND=onnx: the server exports the query path on first start, serves queries with
onnxruntime (registration stays in torch), answers as the torch backend does, and reuses the
exported graph on the next start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from api_tests.helpers import GLYPHS, Server, examples, png, probabilities

QUERIES = [png(kind, shift=(2, -3), stroke=5) for kind in GLYPHS] + [png("circle", size=60)]


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("onnx") / "data", backend="onnx")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_the_model_reports_the_onnx_backend(onnx_server: Server) -> None:
    with onnx_server.client() as client:
        info = client.get("/v1/model").json()
    assert info["backend"] == "onnx"
    exported = list((onnx_server.data_dir / "onnx").glob("*.onnx"))
    assert [p.name for p in exported] == [f"{info['version']}.onnx"]


def test_onnx_answers_as_torch_does(onnx_server: Server, server: Server) -> None:
    body = {"examples": examples(GLYPHS) + examples(GLYPHS[:2], shift=(3, 3))}
    with onnx_server.client() as onnx_client, server.client() as torch_client:
        on_onnx = onnx_client.post("/v1/tasks", json=body).json()
        on_torch = torch_client.post("/v1/tasks", json=body).json()
        assert on_onnx["labels"] == on_torch["labels"]
        got = probabilities(onnx_client, on_onnx["task_id"], QUERIES)
        want = probabilities(torch_client, on_torch["task_id"], QUERIES)
        explained = onnx_client.post(f"/v1/tasks/{on_onnx['task_id']}/classify",
                                     json={"images": QUERIES[:1], "explain": True}).json()
        similarity = [[p["support_similarity"] for p in client.post(
            f"/v1/tasks/{task['task_id']}/classify", json={"images": QUERIES}).json()["predictions"]]
            for client, task in ((onnx_client, on_onnx), (torch_client, on_torch))]
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(similarity[0], similarity[1], atol=1e-4)
    assert on_onnx["warnings"] == on_torch["warnings"]  # the support set is checked in torch on both
    attention = [a["weight"] for a in explained["predictions"][0]["attention"]]
    assert len(attention) == len(body["examples"]) and abs(sum(attention) - 1) < 1e-4


def test_a_restart_reuses_the_exported_graph(onnx_server: Server, tmp_path: Path) -> None:
    graph = next((onnx_server.data_dir / "onnx").glob("*.onnx"))
    stamp = graph.stat().st_mtime_ns
    again = Server(tmp_path / "data", backend="onnx", onnx_path=graph)
    try:
        again.start()
        with again.client() as client:
            task = client.post("/v1/tasks", json={"examples": examples(GLYPHS[:3])}).json()
            assert probabilities(client, task["task_id"], QUERIES[:3]).argmax(axis=1).tolist() == [0, 1, 2]
    finally:
        again.stop()
    assert graph.stat().st_mtime_ns == stamp
