"""Black-box helpers: run the real server in a subprocess, and draw test glyphs as image files.

Nothing here imports `service` or `model`: the server is reached over HTTP only.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from api_tests.harness import REPO as REPO  # re-exported: the tests' way to the repository
from api_tests.harness import ServiceProcess, parse_metrics
from api_tests.harness import free_port as free_port

KiB = 1024


class Server(ServiceProcess):
    """`python -m service` on a free port with its own data directory and settings; hermetic (see
    api_tests.harness.ServiceProcess), logging at info, one server process unless `processes` is given
    (api_tests/test_processes.py covers several)."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        super().__init__(data_dir, data_dir.parent / f"{data_dir.name}-server.log",
                         {"log_level": "info", "processes": 1, **settings})

    @property
    def database(self) -> Path:
        return self.data_dir / "tasks.sqlite3"

    def start(self, wait: bool = True, timeout: float = 180) -> Server:
        super().start(wait, timeout)
        return self

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def as_user(self, key: str) -> httpx.Client:
        """A client that sends `key` as its bearer token (a tenant of a keyed server)."""
        return self.client(headers={"Authorization": f"Bearer {key}"})



def running(server: Server) -> Iterator[Server]:
    """For module fixtures: `yield from running(Server(...))` starts it, and stops it afterwards."""
    try:
        yield server.start()
    finally:
        server.stop()


def registered(server: Server, kinds: Sequence[str]) -> dict[str, Any]:
    """The record of a new task of one glyph per kind (its 201 checked)."""
    with server.client() as client:
        response = client.post("/v1/tasks", json={"examples": examples(kinds)})
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


# ------------------------------------------------------------------------------------- images

GLYPHS = ("circle", "cross", "triangle", "square", "zigzag", "bar")


def glyph(kind: str, *, shift: tuple[int, int] = (0, 0), size: int = 105, stroke: int = 6) -> Image.Image:
    """A black-on-white drawing (as Omniglot's PNGs are), mode "L"."""
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    s = size / 105
    dx, dy = shift

    def p(x: float, y: float) -> tuple[float, float]:
        return (x * s + dx, y * s + dy)

    if kind == "circle":
        draw.ellipse((*p(22, 22), *p(83, 83)), outline=0, width=stroke)
    elif kind == "cross":
        draw.line((*p(22, 22), *p(83, 83)), fill=0, width=stroke)
        draw.line((*p(22, 83), *p(83, 22)), fill=0, width=stroke)
    elif kind == "triangle":
        draw.polygon([p(52, 18), p(88, 86), p(16, 86)], outline=0, width=stroke)
    elif kind == "square":
        draw.rectangle((*p(25, 25), *p(80, 80)), outline=0, width=stroke)
    elif kind == "zigzag":
        draw.line([p(15, 30), p(40, 75), p(65, 30), p(90, 75)], fill=0, width=stroke)
    elif kind == "bar":
        draw.line((*p(52, 15), *p(52, 90)), fill=0, width=stroke)
    else:
        raise ValueError(kind)
    return img


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(kind: str, **kwargs: Any) -> str:
    """A glyph as the API takes it: base64 of a PNG file."""
    return b64(encode(glyph(kind, **kwargs)))


def inverted(img: Image.Image) -> Image.Image:
    return Image.eval(img, lambda v: 255 - v)


def examples(kinds: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
    return [{"label": kind, "image": png(kind, **kwargs)} for kind in kinds]


def tiny_pixels(seed: int) -> dict[str, list[list[int]]]:
    """A cheap 4x4 pixel-array image: for requests that must be rejected before any decoding."""
    rng = np.random.default_rng(seed)
    return {"pixels": ((rng.random((4, 4)) > 0.5) * 255).astype(int).tolist()}


def bomb_png(side: int = 20000) -> bytes:
    """A side x side white PNG: ~76 KB on the wire for 20000, 400 megapixels once decoded."""
    return encode(Image.new("1", (side, side), 1))


# --------------------------------------------------------------------------------- assertions

QUERIES = [png("circle", shift=(3, -2)), png("cross", shift=(-4, 1)), png("triangle", shift=(2, 3))]


def probabilities(client: httpx.Client, task_id: str, images: Sequence[Any] = QUERIES) -> np.ndarray:
    """Full probability vectors (n_query, n_way), in the task's label order."""
    response = client.post(f"/v1/tasks/{task_id}/classify", json={"images": list(images), "top_k": 50})
    assert response.status_code == 200, response.text
    return as_matrix(response.json()["predictions"], client.get(f"/v1/tasks/{task_id}").json()["labels"])


def metrics(client: httpx.Client) -> dict[str, float]:
    """The metanet_* samples of /metrics by name, labels included as written
    (`metanet_dropped_total{reason="deadline"}`); counters under their _total names."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse_metrics(response.text)


def as_matrix(predictions: list[dict[str, Any]], labels: Sequence[str]) -> np.ndarray:
    rows = []
    for prediction in predictions:
        by_label = {entry["label"]: entry["probability"] for entry in prediction["top_k"]}
        rows.append([by_label[label] for label in labels])
    return np.array(rows)


def assert_error(response: httpx.Response, status: int, error_type: str | None = None) -> dict[str, Any]:
    """The contract's error shape and status; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"type", "message", "details"}, error
    assert isinstance(error["message"], str) and error["message"]
    if error_type is not None:
        assert error["type"] == error_type, error
    return error
