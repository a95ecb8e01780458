"""Classification: stored tasks, explanations, every image encoding, and one-off episodes."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from PIL import Image

from api_tests.helpers import QUERIES, as_matrix, b64, encode, examples, glyph, inverted, png, probabilities


def test_classify_returns_top_k_sorted_and_summing_to_at_most_one(client: httpx.Client, sentinel) -> None:
    task = sentinel.tasks[0]
    response = client.post(f"/v1/tasks/{task['task_id']}/classify", json={"images": QUERIES, "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task_id"] == task["task_id"]
    assert body["model_version"] == task["model_version"]
    assert len(body["predictions"]) == len(QUERIES)
    for prediction in body["predictions"]:
        assert "attention" not in prediction  # only with explain
        top = prediction["top_k"]
        assert len(top) == 2
        assert top[0]["probability"] >= top[1]["probability"]
        assert prediction["label"] == top[0]["label"] and prediction["confidence"] == top[0]["probability"]
        assert {t["label"] for t in top} <= set(task["labels"])


def test_classify_top_k_larger_than_n_way_returns_every_label_summing_to_one(client, sentinel) -> None:
    probs = probabilities(client, sentinel.tasks[0]["task_id"])
    assert probs.shape == (len(QUERIES), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_classify_defaults_to_top_1(client: httpx.Client, sentinel) -> None:
    task_id = sentinel.tasks[0]["task_id"]
    body = client.post(f"/v1/tasks/{task_id}/classify", json={"images": QUERIES[:1]}).json()
    assert len(body["predictions"][0]["top_k"]) == 1


def test_explain_returns_attention_over_support_examples_in_support_order(client: httpx.Client) -> None:
    support = examples(("circle", "cross")) + [{"label": "circle", "image": png("circle", shift=(6, 0))}]
    task_id = client.post("/v1/tasks", json={"examples": support}).json()["task_id"]
    response = client.post(f"/v1/tasks/{task_id}/classify", json={"images": QUERIES, "explain": True})
    assert response.status_code == 200, response.text
    for prediction in response.json()["predictions"]:
        attention = prediction["attention"]
        assert [a["example_index"] for a in attention] == [0, 1, 2]
        assert [a["label"] for a in attention] == ["circle", "cross", "circle"]
        assert all(a["weight"] >= 0 for a in attention)
        assert sum(a["weight"] for a in attention) == pytest.approx(1.0, abs=1e-5)


def _encodings() -> dict[str, object]:
    drawing = glyph("triangle", shift=(2, 3))
    grey = np.asarray(drawing)
    return {
        "png": b64(encode(drawing)),
        "white_on_black_png": b64(encode(inverted(drawing))),
        "data_url": "data:image/png;base64," + b64(encode(drawing)),
        "bmp": b64(encode(drawing, "BMP")),
        "gif": b64(encode(drawing, "GIF")),
        "webp_lossless": b64(encode_lossless_webp(drawing)),
        "mode_1_png": b64(encode(drawing.convert("1", dither=0))),
        "rgba_on_transparent": b64(encode(transparent_strokes(drawing))),
        "white_pen_on_transparent": b64(encode(transparent_strokes(drawing, pen=255))),
        "base64_with_line_breaks": "\n".join(_chunks(b64(encode(drawing)), 76)),
        "pixels_ints": {"pixels": grey.astype(int).tolist()},
        "pixels_floats": {"pixels": (grey / 255.0).tolist()},
        "pixels_floats_white_on_black": {"pixels": (1.0 - grey / 255.0).tolist()},
    }


def encode_lossless_webp(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def transparent_strokes(img, pen: int | None = None):
    """The strokes on a transparent canvas, as a browser canvas exports them: black, or all in
    one shade `pen` (255: a white pen, as apps with a dark theme draw)."""
    rgba = img.convert("RGBA") if pen is None else Image.new("RGBA", img.size, (pen, pen, pen, 0))
    alpha = inverted(img)  # opaque where there is ink
    rgba.putalpha(alpha)
    return rgba


def _chunks(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(0, len(text), n)]


def test_every_image_encoding_and_polarity_gives_the_same_prediction(client: httpx.Client, sentinel) -> None:
    task_id = sentinel.tasks[0]["task_id"]
    encodings = _encodings()
    request = {"images": list(encodings.values()), "top_k": 3}
    response = client.post(f"/v1/tasks/{task_id}/classify", json=request)
    assert response.status_code == 200, response.text
    probs = as_matrix(response.json()["predictions"], sentinel.tasks[0]["labels"])
    for name, row in zip(encodings, probs, strict=True):
        np.testing.assert_allclose(row, probs[0], atol=1e-6, rtol=0, err_msg=name)


def test_one_off_classify_matches_a_stored_task_and_stores_nothing(client: httpx.Client, sentinel) -> None:
    task = sentinel.tasks[0]
    listing = sentinel.listing()
    support = examples(tuple(task["labels"]))
    response = client.post("/v1/classify", json={"support": support, "images": QUERIES, "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model_version", "predictions"}
    one_off = as_matrix(body["predictions"], task["labels"])
    np.testing.assert_allclose(one_off, probabilities(client, task["task_id"]), atol=1e-6, rtol=0)
    assert sentinel.listing() == listing


def test_one_off_classify_can_explain(client: httpx.Client) -> None:
    body = {"support": examples(("bar", "square")), "images": QUERIES[:1], "explain": True}
    prediction = client.post("/v1/classify", json=body).json()["predictions"][0]
    assert [a["label"] for a in prediction["attention"]] == ["bar", "square"]


def test_a_glyph_is_framed_as_training_frames_it_wherever_and_however_large_it_is_drawn(
    client: httpx.Client, sentinel,
) -> None:
    # The canonical framing: the glyph's bounding box, scaled to the model's frame and centred, so
    # the registered drawing gives the same input in a corner of a larger canvas, drawn at twice
    # the size or in a wide one; the old whole-image shrink gave each a different input.
    task = sentinel.tasks[0]
    drawing = glyph("triangle")
    corner = Image.new("L", (300, 220), 255)
    corner.paste(drawing, (190, 110))
    wide = Image.new("L", (420, 105), 255)
    wide.paste(drawing, (20, 0))
    images = [b64(encode(img)) for img in (drawing, corner, drawing.resize((210, 210), Image.NEAREST), wide)]
    response = client.post(f"/v1/tasks/{task['task_id']}/classify", json={"images": images, "top_k": 3})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    probs = as_matrix(predictions, task["labels"])
    for row in probs[1:]:
        np.testing.assert_allclose(row, probs[0], atol=1e-3)
    for prediction in predictions:  # the registered triangle, wherever it is drawn
        assert prediction["label"] == "triangle"
        assert prediction["support_similarity"] == pytest.approx(1.0, abs=0.02)
