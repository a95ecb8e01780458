"""White-box tests of service/v2_tensors.py: infer requests in JSON and in Triton's binary tensor
extension -> query images, and probabilities -> responses in either form."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError

from service.errors import BadRequest, InvalidInput, MalformedJSON
from service.http.v2_tensors import Inference, Output, encode_infer_response, parse_infer_request

PNG = b"\x89PNG\r\n\x1a\n-not-really-but-binary"


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), str(len(text))


def parse(document: dict[str, Any]) -> Inference:
    return parse_infer_request(json.dumps(document).encode(), None, 28)


def test_json_bytes_are_base64_strings_passed_on_as_they_are():
    data = ["aGk=", "data:image/png;base64,aGk="]
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [2], "data": data}
    inference = parse({"id": "r1", "inputs": [tensor]})
    assert inference.id == "r1"
    assert inference.images == ["aGk=", "data:image/png;base64,aGk="]
    assert [o.name for o in inference.outputs] == ["PROBABILITIES", "LABEL", "SUPPORT_SIMILARITY"]
    assert not any(o.binary for o in inference.outputs)
    assert inference.min_confidence == 0.0


def test_binary_bytes_are_files_or_base64_text():
    text = base64.b64encode(PNG)
    chunk = bytes_tensor(PNG, text)
    body, length = binary_body({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2],
                                            "parameters": {"binary_data_size": len(chunk)}}],
                                "parameters": {"binary_data_output": True}}, chunk)
    inference = parse_infer_request(body, length, 28)
    assert inference.images == [PNG, text.decode()]
    assert all(o.binary for o in inference.outputs)


@pytest.mark.parametrize("binary", [False, True])
def test_fp32_pixels_nested_flat_or_binary(binary):
    pixels = np.random.default_rng(0).random((2, 28, 28), dtype=np.float32)
    tensor = {"name": "PIXELS", "datatype": "FP32", "shape": [2, 28, 28]}
    if binary:
        blob = pixels.astype("<f4").tobytes()
        header = {"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}]}
        body, length = binary_body(header, blob)
        images = parse_infer_request(body, length, 28).images
    else:
        images = parse({"inputs": [{**tensor, "data": pixels.tolist()}]}).images
        flat = parse({"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}).images
        np.testing.assert_array_equal(np.stack(flat), np.stack(images))
    np.testing.assert_allclose(np.stack(images), pixels)


def test_requested_outputs_with_classification_and_binary_flags():
    inference = parse({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
                       "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 3,
                                                                             "binary_data": True}},
                                   {"name": "LABEL"}]})
    assert inference.outputs == [Output("PROBABILITIES", True, 3), Output("LABEL", False, 0)]


@pytest.mark.parametrize("value", [0, 0.25, 1])
def test_min_confidence_is_a_request_parameter(value):
    inference = parse({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
                       "parameters": {"min_confidence": value}})
    assert inference.min_confidence == value


@pytest.mark.parametrize("value", [1.5, -0.1, True, "0.5", None, [0.5]])
def test_a_min_confidence_out_of_range_or_not_a_number_names_the_parameter(value):
    with pytest.raises(InvalidInput) as caught:
        parse({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
               "parameters": {"min_confidence": value}})
    assert caught.value.body()["error"]["message"].startswith("parameters.min_confidence: must be a number")


@pytest.mark.parametrize(("body", "length", "error", "says"), [
    (b"{", None, MalformedJSON, "not valid JSON"),
    (b"{}", "3", BadRequest, "Inference-Header-Content-Length"),
    (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [7]}]}', None, InvalidInput,
     "must be strings"),
    (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [0], "data": []}]}', None, InvalidInput,
     "no images"),
    (b'{"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 28, 27], "data": []}]}', None,
     InvalidInput, "[n, 28, 28]"),
    (b'{"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 28, 28], "data": [true]}]}', None,
     InvalidInput, "numbers only"),
    (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGk="],'
     b' "parameters": {"shared_memory_region": "r"}}]}', None, InvalidInput, "shared-memory"),
    (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],'
     b' "outputs": [{"name": "SCORES"}]}', None, InvalidInput, "unknown output"),
])
def test_malformed_requests_are_refused_with_a_reason(body, length, error, says):
    with pytest.raises(error) as caught:
        parse_infer_request(body, length, 28)
    assert says in caught.value.body()["error"]["message"]


@pytest.mark.parametrize(("size", "tail", "says"), [(9, b"abc", "binary_data_size"),
                                                    (None, b"extra", "belong to no input")])
def test_binary_data_must_match_the_inputs_sizes(size, tail, says):
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}
    if size is not None:
        tensor = {**tensor, "parameters": {"binary_data_size": size}}
    with pytest.raises(BadRequest, match=says):
        parse_infer_request(*binary_body({"inputs": [tensor]}, tail), 28)


def test_request_fields_are_validated():
    with pytest.raises(RequestValidationError):
        parse({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": ["1"], "data": ["aGk="]}]})


PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
LABELS = ["alpha", "beta", "a:b"]
SIMILARITY = np.array([0.875, -0.25], dtype=np.float32)


def split_binary(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    n = int(headers["Inference-Header-Content-Length"])
    return json.loads(body[:n]), body[n:]


def test_json_response_with_classification_in_tritons_format():
    inference = Inference("q", [], [Output("PROBABILITIES", False, 2), Output("LABEL", False)])
    body, headers = encode_infer_response(inference, "task", "v1", PROBS, LABELS, SIMILARITY)
    assert headers == {"Content-Type": "application/json"}
    document = json.loads(body)
    assert (document["model_name"], document["model_version"], document["id"]) == ("task", "v1", "q")
    top, label = document["outputs"]
    assert (top["datatype"], top["shape"]) == ("BYTES", [2, 2])
    assert top["data"] == ["0.700000:0:alpha", "0.200000:1:beta", "0.600000:2:a:b", "0.300000:1:beta"]
    assert label == {"name": "LABEL", "datatype": "BYTES", "shape": [2], "data": ["alpha", "a:b"]}


def test_binary_response_appends_each_outputs_data_after_the_header():
    inference = Inference(None, [], [Output("PROBABILITIES", True), Output("LABEL", True)])
    body, headers = encode_infer_response(inference, "task", "v1", PROBS, LABELS, SIMILARITY)
    document, blob = split_binary(body, headers)
    assert "id" not in document
    probs, label = document["outputs"]
    assert (probs["datatype"], probs["shape"], "data" in probs) == ("FP32", [2, 3], False)
    n = probs["parameters"]["binary_data_size"]
    np.testing.assert_array_equal(np.frombuffer(blob[:n], "<f4").reshape(2, 3), PROBS)
    assert blob[n:] == bytes_tensor(b"alpha", b"a:b")
    assert label["parameters"]["binary_data_size"] == len(blob) - n


@pytest.mark.parametrize("binary", [False, True])
def test_support_similarity_is_an_fp32_output_of_one_value_a_query(binary):
    inference = Inference(None, [], [Output("SUPPORT_SIMILARITY", binary)])
    body, headers = encode_infer_response(inference, "task", "v1", PROBS, LABELS, SIMILARITY)
    if binary:
        document, blob = split_binary(body, headers)
        [tensor] = document["outputs"]
        values = np.frombuffer(blob, "<f4").tolist()
        assert tensor["parameters"]["binary_data_size"] == 8
    else:
        [tensor] = json.loads(body)["outputs"]
        values = tensor["data"]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("SUPPORT_SIMILARITY", "FP32", [2])
    assert values == [0.875, -0.25]


def test_a_query_below_min_confidence_gets_an_empty_label():
    outputs = [Output("LABEL", False), Output("PROBABILITIES", False)]
    inference = Inference(None, [], outputs, min_confidence=0.65)
    body, _ = encode_infer_response(inference, "task", "v1", PROBS, LABELS, SIMILARITY)
    label, probs = json.loads(body)["outputs"]
    assert label["data"] == ["alpha", ""]  # 0.7 is enough, 0.6 is not
    assert probs["data"] == pytest.approx(PROBS.ravel().tolist())  # the probabilities as ever
