"""Tensors of the Open Inference Protocol (KServe v2 / Triton HTTP): an infer request's body -> the
query images and parameters, and scores -> the response's body, in JSON or with Triton's binary
extension.

The binary tensor data extension: the body is a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw data of every input whose `parameters.binary_data_size` is set, in input
order. BYTES elements are each a 4-byte little-endian length and the bytes; FP32 is little-endian.
Responses use it for outputs requested with `binary_data` (or `binary_data_output` on the request).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import BadRequest, InvalidInput, MalformedJSON

# The inputs a task-model takes (a request sends exactly one) and the outputs it gives.
IMAGE, PIXELS = "IMAGE", "PIXELS"  # BYTES [-1]: encoded image files; FP32 [-1, S, S]: greys in [0, 1]
PROBABILITIES, LABEL = "PROBABILITIES", "LABEL"  # FP32 [-1, n_way]; BYTES [-1]: the top-1 label
# FP32 [-1]: each query's best cosine similarity to the support set (/v1's support_similarity)
SUPPORT_SIMILARITY = "SUPPORT_SIMILARITY"
OUTPUTS = (PROBABILITIES, LABEL, SUPPORT_SIMILARITY)
MIN_CONFIDENCE = "min_confidence"  # a request parameter: below it, LABEL is "" (none of these)
BINARY_HEADER = "Inference-Header-Content-Length"

_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+|data:.*", re.DOTALL)


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InputTensor(_Tensor):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class RequestedOutput(_Tensor):
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(_Tensor):
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: Annotated[list[InputTensor], Field(min_length=1)]
    outputs: list[RequestedOutput] | None = None


@dataclass(frozen=True)
class Output:
    """One output to send: `classification` > 0 asks for the top-k as "score:index:label" strings."""

    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True)
class Inference:
    """What an infer request asks: the query images (str: base64 file, bytes: the file, or an
    (S, S) float32 array of grey levels), the outputs to send back, and the least probability a
    LABEL is given for."""

    id: str | None
    images: list[str | bytes | np.ndarray]
    outputs: list[Output]
    min_confidence: float = 0.0


def parse_infer_request(body: bytes, header_length: str | None, image_size: int) -> Inference:
    """The body of POST /v2/models/{task_id}/infer, with or without the binary extension."""
    header, binary = _split_body(body, header_length)
    try:
        document = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedJSON(f"the inference header is not valid JSON ({exc})") from None
    try:
        request = InferRequest.model_validate(document)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    chunks = _binary_chunks(request.inputs, binary)
    if len(request.inputs) != 1:
        raise InvalidInput(f"send exactly one input, {IMAGE} (BYTES) or {PIXELS} (FP32); "
                           f"got {len(request.inputs)}", field="inputs")
    tensor, chunk = request.inputs[0], chunks[0]
    if tensor.parameters.get("shared_memory_region") is not None:
        raise InvalidInput("the shared-memory extension is not supported", field="inputs[0].parameters")
    if tensor.name == IMAGE:
        images: list[Any] = _image_files(tensor, chunk)
    elif tensor.name == PIXELS:
        images = list(_grey_levels(tensor, chunk, image_size))
    else:
        raise InvalidInput(f"unknown input {tensor.name!r}; the inputs are {IMAGE} (BYTES, shape [n]) and "
                           f"{PIXELS} (FP32, shape [n, {image_size}, {image_size}])", field="inputs[0].name")
    if not images:
        raise InvalidInput("the input holds no images", field="inputs[0].shape")
    return Inference(request.id, images, _outputs(request), _min_confidence(request.parameters))


def encode_infer_response(
    inference: Inference, model_name: str, model_version: str, probs: np.ndarray, labels: list[str],
    similarity: np.ndarray,
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the infer response. `probs` is (n_query, n_way), column k for labels[k];
    `similarity` (n_query,) each query's best cosine to the support set."""
    n, n_way = probs.shape
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in inference.outputs:
        if output.name == PROBABILITIES and output.classification:
            k = min(output.classification, n_way)
            best = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (n_query, k)
            # Triton's classification format; a label may itself hold ':', so split at most twice.
            data: list[Any] = [f"{probs[i, j]:f}:{j}:{labels[j]}" for i in range(n) for j in best[i]]
            datatype, shape = "BYTES", [n, int(k)]
        elif output.name == PROBABILITIES:
            data, datatype, shape = probs.astype(float).ravel().tolist(), "FP32", [n, n_way]
        elif output.name == SUPPORT_SIMILARITY:
            data, datatype, shape = similarity.astype(float).tolist(), "FP32", [n]
        else:  # BYTES hold no null: "" (never a label, which is non-empty) for none of these
            data = [labels[j] if probs[i, j] >= inference.min_confidence else ""
                    for i, j in enumerate(probs.argmax(axis=1))]
            datatype, shape = "BYTES", [n]
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            blob = _bytes_tensor(data) if datatype == "BYTES" else np.asarray(data, "<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = data
        tensors.append(tensor)
    document = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if inference.id is not None:
        document["id"] = inference.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                      BINARY_HEADER: str(len(header))}


# --------------------------------------------------------------------------------- requests

def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"{BINARY_HEADER} must be a byte count of at most the body's "
                         f"{len(body)} bytes, not {header_length!r}")
    n = int(header_length)
    return body[:n], body[n:]


def _binary_chunks(inputs: list[InputTensor], binary: bytes) -> list[bytes | None]:
    """Each input's slice of the binary data (None: its data is in the JSON)."""
    chunks: list[bytes | None] = []
    offset = 0
    for i, tensor in enumerate(inputs):
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            chunks.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadRequest(f"inputs[{i}].parameters.binary_data_size: {size!r} does not fit the "
                             f"{len(binary) - offset} binary bytes left after the inference header")
        chunks.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes after the inputs' binary data belong to no input")
    return chunks


def _image_files(tensor: InputTensor, chunk: bytes | None) -> list[str | bytes]:
    _check_datatype(tensor, "BYTES")
    n = _count(tensor.shape, ok=len(tensor.shape) == 1 or tensor.shape[1:] == [1], expected="[n] or [n, 1]")
    if chunk is not None:
        files: list[str | bytes] = [_as_image(e) for e in _split_bytes_tensor(chunk)]
    else:
        files = [_string(v, i) for i, v in enumerate(_flatten(tensor.data, "inputs[0].data"))]
    if len(files) != n:
        raise InvalidInput(f"shape {tensor.shape} needs {n} elements; the data holds {len(files)}",
                           field="inputs[0].data")
    return files


def _grey_levels(tensor: InputTensor, chunk: bytes | None, size: int) -> np.ndarray:
    """(n, S, S) float32 in [0, 1]. Either polarity is fine: the service finds and frames the ink
    as for v1 (`model.transform.canonical`)."""
    _check_datatype(tensor, "FP32")
    n = _count(tensor.shape, ok=tensor.shape[1:] == [size, size], expected=f"[n, {size}, {size}]")
    if chunk is not None:
        if len(chunk) % 4:
            raise InvalidInput(f"FP32 binary data of {len(chunk)} bytes is not whole 4-byte floats",
                               field="inputs[0]")
        values = np.frombuffer(chunk, dtype="<f4")
    else:
        flat = _flatten(tensor.data, "inputs[0].data")
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in flat):
            raise InvalidInput("FP32 data must hold numbers only", field="inputs[0].data")
        values = np.array(flat, dtype=np.float32)
    if values.size != n * size * size:
        raise InvalidInput(f"shape {tensor.shape} needs {n * size * size} values; the data holds "
                           f"{values.size}", field="inputs[0].data")
    if not np.isfinite(values).all() or values.min(initial=0.0) < 0 or values.max(initial=0.0) > 1:
        raise InvalidInput("FP32 pixels must be finite and lie in [0, 1]", field="inputs[0].data")
    return values.astype(np.float32).reshape(n, size, size)


def _check_datatype(tensor: InputTensor, datatype: str) -> None:
    if tensor.datatype != datatype:
        raise InvalidInput(f"input {tensor.name} has datatype {datatype}, not {tensor.datatype}",
                           field="inputs[0].datatype")


def _count(shape: list[int], *, ok: bool, expected: str) -> int:
    if not shape or not ok:
        raise InvalidInput(f"the shape must be {expected}, not {shape}", field="inputs[0].shape")
    return shape[0]


def _flatten(data: Any, field: str) -> list[Any]:
    """JSON tensor data, flat or nested in row-major order -> one flat list."""
    if not isinstance(data, list):
        raise InvalidInput("the tensor's data must be a JSON array (or binary data)", field=field)
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _string(value: Any, index: int) -> str:
    if not isinstance(value, str):
        raise InvalidInput("BYTES data in JSON must be strings: base64 of an image file",
                           field=f"inputs[0].data[{index}]", index=index)
    return value


def _split_bytes_tensor(chunk: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise InvalidInput("BYTES binary data ends inside an element's length", field="inputs[0]")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise InvalidInput("a BYTES element is longer than the binary data left", field="inputs[0]")
        elements.append(chunk[offset:offset + length])
        offset += length
    return elements


def _as_image(element: bytes) -> str | bytes:
    """A binary BYTES element is the image file itself, or (from a client that was handed base64
    strings) its base64 text: image files start with non-text bytes, so the two cannot be confused."""
    if _BASE64_TEXT.fullmatch(element):
        try:
            return element.decode("ascii")
        except UnicodeDecodeError:
            pass
    return element


def _bytes_tensor(strings: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in strings))


def _min_confidence(parameters: dict[str, Any]) -> float:
    value = parameters.get(MIN_CONFIDENCE, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidInput(f"must be a number in [0, 1], not {value!r}", field=f"parameters.{MIN_CONFIDENCE}")
    return float(value)


def _outputs(request: InferRequest) -> list[Output]:
    binary_default = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return [Output(name, binary_default) for name in OUTPUTS]
    outputs = []
    for i, requested in enumerate(request.outputs):
        field = f"outputs[{i}]"
        if requested.name not in OUTPUTS:
            raise InvalidInput(f"unknown output {requested.name!r}; the outputs are {', '.join(OUTPUTS)}",
                               field=f"{field}.name")
        binary = requested.parameters.get("binary_data", binary_default)
        k = requested.parameters.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidInput(f"classification must be a count of classes, not {k!r}",
                               field=f"{field}.parameters.classification")
        if k and requested.name != PROBABILITIES:
            raise InvalidInput(f"classification applies to {PROBABILITIES}", field=f"{field}.parameters")
        outputs.append(Output(requested.name, binary is True, k))
    return outputs

