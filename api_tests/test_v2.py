"""The Open Inference Protocol (KServe v2 / Triton HTTP) endpoints, driven by NVIDIA's own client,
`tritonclient[http]`: health, metadata, and inference with top-k classification, in JSON and in
the binary tensor extension that client uses by default; plus the protocol's error shape over raw
HTTP. Each task is a model named by its task id; API keys work as for /v1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from api_tests.helpers import KiB, Server, as_matrix, encode, examples, glyph, png

try:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException
except ImportError as exc:  # CI installs it (the dev extra): fail loudly rather than skip
    raise ImportError(f"{exc}: pip install 'tritonclient[http]>=2.50,<3'") from exc

ALICE, BOB = "alice-v2-key", "bob-v2-key"
LABELS = ["circle", "cross", "bar"]
QUERY_KINDS = ["cross", "bar", "circle"]  # what each query image shows
SHIFTS = [(-4, 1), (2, 0), (3, -2)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("v2") / "data", api_keys=f"{ALICE},{BOB}",
                    max_body_bytes=512 * KiB, torch_threads=1)
    try:
        yield server.start()
    finally:
        server.stop()


def bearer(key: str = ALICE) -> dict[str, str]:
    """A fresh headers dict each time: tritonclient's infer adds its own headers to the one it gets."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def task(server: Server) -> dict[str, Any]:
    with server.client(headers=bearer()) as client:
        response = client.post("/v1/tasks", json={"name": "v2", "examples": examples(LABELS)})
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture
def triton_client(server: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120.0)
    try:
        yield client
    finally:
        client.close()


def image_input(files: np.ndarray, binary: bool = True) -> triton.InferInput:
    """tritonclient's default is the binary extension; binary=False puts the data in the JSON."""
    tensor = triton.InferInput("IMAGE", [len(files)], "BYTES")
    tensor.set_data_from_numpy(files, binary_data=binary)
    return tensor


def query_files() -> np.ndarray:
    """The queries as tritonclient takes BYTES: an object array of encoded PNG files."""
    files = [encode(glyph(kind, shift=shift)) for kind, shift in zip(QUERY_KINDS, SHIFTS, strict=True)]
    return np.array(files, dtype=np.object_)


def v1_predictions(server: Server, task_id: str) -> list[dict[str, Any]]:
    queries = [png(kind, shift=shift) for kind, shift in zip(QUERY_KINDS, SHIFTS, strict=True)]
    with server.client(headers=bearer()) as client:
        response = client.post(f"/v1/tasks/{task_id}/classify", json={"images": queries, "top_k": 10})
        assert response.status_code == 200, response.text
        predictions: list[dict[str, Any]] = response.json()["predictions"]
        return predictions


def v1_probabilities(server: Server, task_id: str) -> np.ndarray:
    return as_matrix(v1_predictions(server, task_id), LABELS)


# ------------------------------------------------------------------------------ health, metadata

def test_server_is_live_and_ready_without_a_key(triton_client) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata()
    assert {"classification", "binary_tensor_data"} <= set(metadata["extensions"])


def test_model_metadata_names_the_task_its_version_inputs_and_outputs(triton_client, task) -> None:
    metadata = triton_client.get_model_metadata(task["task_id"], headers=bearer())
    assert metadata["name"] == task["task_id"]
    assert metadata["versions"] == [task["model_version"]]
    assert metadata["platform"] == "metanet"
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["inputs"]} == {
        ("IMAGE", "BYTES", (-1,)), ("PIXELS", "FP32", (-1, 28, 28))}
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["outputs"]} == {
        ("PROBABILITIES", "FP32", (-1, 3)), ("LABEL", "BYTES", (-1,)), ("SUPPORT_SIMILARITY", "FP32", (-1,))}
    assert metadata["parameters"]["labels"] == LABELS


def test_model_is_ready_for_its_owner_only(triton_client, task) -> None:
    assert triton_client.is_model_ready(task["task_id"], headers=bearer())
    assert triton_client.is_model_ready(task["task_id"], task["model_version"], headers=bearer())
    assert not triton_client.is_model_ready(task["task_id"], headers=bearer(BOB))
    assert not triton_client.is_model_ready("no-such-task", headers=bearer())
    assert not triton_client.is_model_ready(task["task_id"], "no-such-version", headers=bearer())


# ------------------------------------------------------------------------------------ inference

def test_infer_with_binary_images_returns_top_k_classification(triton_client, task) -> None:
    images = image_input(query_files())
    outputs = [triton.InferRequestedOutput("PROBABILITIES", class_count=2),
               triton.InferRequestedOutput("LABEL")]
    result = triton_client.infer(task["task_id"], [images], outputs=outputs, request_id="q-1",
                                 headers=bearer())

    assert result.get_response()["model_name"] == task["task_id"]
    assert result.get_response()["model_version"] == task["model_version"]
    assert result.get_response()["id"] == "q-1"
    top = result.as_numpy("PROBABILITIES")
    assert top.shape == (3, 2)
    for row, kind in zip(top, QUERY_KINDS, strict=True):
        # Triton's classification format: "score:index:label", best first.
        entries = [entry.decode().split(":", 2) for entry in row]
        scores = [float(score) for score, _, _ in entries]
        assert scores == sorted(scores, reverse=True) and 0 <= scores[1] <= scores[0] <= 1
        assert all(LABELS[int(index)] == label for _, index, label in entries)
        assert entries[0][2] == kind
    assert [label.decode() for label in result.as_numpy("LABEL")] == QUERY_KINDS


def test_infer_in_json_and_binary_agree_with_v1(server, triton_client, task) -> None:
    expected = v1_probabilities(server, task["task_id"])
    as_text = np.array([png(kind, shift=shift) for kind, shift in zip(QUERY_KINDS, SHIFTS, strict=True)],
                       dtype=np.object_)  # JSON BYTES: base64 of the files
    json_input = image_input(as_text, binary=False)
    json_output = triton.InferRequestedOutput("PROBABILITIES", binary_data=False)
    result = triton_client.infer(task["task_id"], [json_input], outputs=[json_output], headers=bearer())
    assert result.get_output("PROBABILITIES")["data"]  # came back in the JSON itself
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), expected, atol=1e-5)

    binary_input = image_input(query_files())
    result = triton_client.infer(task["task_id"], [binary_input], headers=bearer())  # all outputs, binary
    assert result.as_numpy("PROBABILITIES").shape == (3, 3)
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), expected, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES").sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_gives_each_querys_support_similarity_as_v1_does(server, triton_client, task, binary) -> None:
    expected = [p["support_similarity"] for p in v1_predictions(server, task["task_id"])]
    output = triton.InferRequestedOutput("SUPPORT_SIMILARITY", binary_data=binary)
    result = triton_client.infer(task["task_id"], [image_input(query_files())], headers=bearer(),
                                 outputs=[output])
    similarity = result.as_numpy("SUPPORT_SIMILARITY")
    assert similarity.dtype == np.float32 and similarity.shape == (3,)
    np.testing.assert_allclose(similarity, expected, atol=1e-5)
    every = triton_client.infer(task["task_id"], [image_input(query_files())], headers=bearer())
    np.testing.assert_allclose(every.as_numpy("SUPPORT_SIMILARITY"), expected, atol=1e-5)  # a default output


def test_min_confidence_parameter_empties_the_label_of_a_query_below_it(server, triton_client) -> None:
    twice = png("circle")  # one circle under two labels: a circle query cannot be sure of either
    support = [{"label": "circle", "image": twice}, {"label": "ring", "image": twice},
               *examples(["cross"])]
    with server.client(headers=bearer()) as client:
        task_id = client.post("/v1/tasks", json={"examples": support}).json()["task_id"]
    files = np.array([encode(glyph("circle")), encode(glyph("cross"))], dtype=np.object_)

    def infer(**parameters: Any) -> tuple[list[str], np.ndarray]:
        result = triton_client.infer(task_id, [image_input(files)], headers=bearer(),
                                     parameters=parameters or None)
        return [label.decode() for label in result.as_numpy("LABEL")], result.as_numpy("PROBABILITIES")

    labels, probs = infer()
    best = probs.max(axis=1)
    assert labels[1] == "cross" and best[0] < 1.0, probs
    threshold = float(np.nextafter(best[0], np.float32(2)))  # just above the circle's confidence
    strict, same = infer(min_confidence=threshold)
    np.testing.assert_array_equal(same, probs)  # the probabilities as ever
    assert strict == [label if p >= threshold else "" for label, p in zip(labels, best, strict=True)]
    assert strict[0] == ""
    assert infer(min_confidence=0)[0] == labels


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("light_on_dark", [False, True], ids=["ink=1", "ink=0"])
def test_infer_takes_fp32_pixels_in_either_polarity(triton_client, task, binary, light_on_dark) -> None:
    drawings = [glyph(kind, shift=shift, size=28, stroke=2)
                for kind, shift in zip(QUERY_KINDS, SHIFTS, strict=True)]
    ink = 1.0 - np.stack([np.asarray(d, dtype=np.float32) for d in drawings]) / 255.0  # ink = 1
    pixels = triton.InferInput("PIXELS", [3, 28, 28], "FP32")
    pixels.set_data_from_numpy((1.0 - ink if light_on_dark else ink).astype(np.float32), binary_data=binary)
    result = triton_client.infer(task["task_id"], [pixels], model_version=task["model_version"],
                                 outputs=[triton.InferRequestedOutput("LABEL", binary_data=binary)],
                                 headers=bearer())
    assert [label.decode() if isinstance(label, bytes) else label
            for label in result.as_numpy("LABEL")] == QUERY_KINDS


# --------------------------------------------------------------------------------------- errors

def test_another_keys_task_is_not_found(triton_client, task) -> None:
    images = image_input(query_files())
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer(task["task_id"], [images], headers=bearer(BOB))
    assert caught.value.status() == "404"
    assert task["task_id"] in caught.value.message()


def v2_error(response: httpx.Response, status: int) -> str:
    """The protocol's error shape: {"error": "<message>"}, nothing else."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def infer_body(name: str = "IMAGE", datatype: str = "BYTES", shape: list[int] | None = None,
               data: Any = None) -> dict[str, Any]:
    data = [png("circle")] if data is None else data
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}]}


@pytest.mark.parametrize(("body", "status", "says"), [
    (infer_body(data=["not base64!"]), 422, "base64"),
    (infer_body(datatype="FP32"), 422, "datatype"),
    (infer_body(name="INPUT__0"), 422, "unknown input"),
    (infer_body(shape=[2]), 422, "needs 2"),
    (infer_body("PIXELS", "FP32", [1, 28, 28], [[2.0] * 28] * 28), 422, "[0, 1]"),
    ({**infer_body(), "outputs": [{"name": "LABEL", "parameters": {"classification": 2}}]}, 422,
     "classification"),
    ({"inputs": []}, 422, "inputs"),
    ({**infer_body(), "parameters": {"min_confidence": 1.5}}, 422, "parameters.min_confidence: "),
    ({**infer_body(), "parameters": {"min_confidence": "high"}}, 422, "parameters.min_confidence: "),
])
def test_invalid_infer_requests_get_the_v2_error_shape(server, task, body, status, says) -> None:
    with server.client(headers=bearer()) as client:
        message = v2_error(client.post(f"/v2/models/{task['task_id']}/infer", json=body), status)
    assert says in message


def test_framing_auth_and_size_errors_get_the_v2_error_shape(server, task) -> None:
    path = f"/v2/models/{task['task_id']}/infer"
    with server.client() as client:
        assert "Bearer" in v2_error(client.get(f"/v2/models/{task['task_id']}"), 401)
        assert "no task" in v2_error(client.get("/v2/models/nope", headers=bearer()), 404)
        assert "JSON" in v2_error(client.post(path, content=b"{", headers=bearer()), 400)
        header = json.dumps(infer_body()).encode()
        too_long = {**bearer(), "Inference-Header-Content-Length": str(len(header) + 10)}
        response = client.post(path, content=header, headers=too_long)
        assert "Inference-Header-Content-Length" in v2_error(response, 400)
        big = json.dumps(infer_body(data=["A" * (600 * KiB)]))
        json_type = {**bearer(), "Content-Type": "application/json"}
        assert "at most" in v2_error(client.post(path, content=big, headers=json_type), 413)
        text_type = {**bearer(), "Content-Type": "text/plain"}
        assert "text/plain" in v2_error(client.post(path, content=header, headers=text_type), 415)
        # /v1 keeps its own error shape
        error = client.get("/v1/tasks/nope", headers=bearer()).json()["error"]
        assert set(error) == {"type", "message", "details"}
