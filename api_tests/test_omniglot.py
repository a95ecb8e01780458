"""Real data through HTTP: 20-way one-shot Omniglot tasks (evaluation alphabets) as 105x105 PNGs.

Needs $METANET_OMNIGLOT_DIR (omniglot_evaluation.npz); fails, rather than skips, without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from api_tests.helpers import b64, encode

N_TASKS, WAY, QUERIES_PER_CLASS, BATCH = 10, 20, 5, 50
MIN_ACCURACY = 0.90


def evaluation_ink() -> np.ndarray:
    """(n_chars, 20, 105, 105) uint8, ink = 1, as packed in the npz."""
    data_dir = os.environ.get("METANET_OMNIGLOT_DIR")
    if not data_dir:
        pytest.fail("set METANET_OMNIGLOT_DIR to the directory holding omniglot_evaluation.npz")
    path = Path(data_dir) / "omniglot_evaluation.npz"
    if not path.is_file():
        pytest.fail(f"{path} does not exist")
    with np.load(path) as d:
        return np.unpackbits(d["images"], axis=-1)[..., : int(d["width"])]


def as_png(ink: np.ndarray) -> str:
    """Black strokes on white, as Omniglot's own PNG files."""
    return b64(encode(Image.fromarray((255 * (1 - ink)).astype(np.uint8), mode="L")))


@pytest.mark.slow
@pytest.mark.accuracy
def test_20_way_one_shot_omniglot_accuracy_over_http_is_at_least_90_percent(client: httpx.Client) -> None:
    ink = evaluation_ink()
    rng = np.random.default_rng(2017)
    correct = total = 0
    for t in range(N_TASKS):
        chars = rng.choice(len(ink), size=WAY, replace=False)
        drawings = np.stack([rng.permutation(ink.shape[1])[: 1 + QUERIES_PER_CLASS] for _ in chars])
        labels = [f"char-{c}" for c in chars]
        support = [{"label": label, "image": as_png(ink[c, d[0]])}
                   for label, c, d in zip(labels, chars, drawings, strict=True)]
        response = client.post("/v1/tasks", json={"name": f"omniglot-{t}", "examples": support})
        assert response.status_code == 201, response.text
        task_id = response.json()["task_id"]
        queries = [(label, as_png(ink[c, j]))
                   for label, c, d in zip(labels, chars, drawings, strict=True) for j in d[1:]]
        for start in range(0, len(queries), BATCH):
            batch = queries[start : start + BATCH]
            response = client.post(f"/v1/tasks/{task_id}/classify", json={"images": [q for _, q in batch]})
            assert response.status_code == 200, response.text
            predicted = [p["label"] for p in response.json()["predictions"]]
            correct += sum(p == label for p, (label, _) in zip(predicted, batch, strict=True))
            total += len(batch)
        assert client.delete(f"/v1/tasks/{task_id}").status_code == 204
    accuracy = correct / total
    print(f"\n20-way one-shot over {N_TASKS} tasks, {total} queries: accuracy {accuracy:.3f}")
    assert accuracy >= MIN_ACCURACY, f"accuracy {accuracy:.3f} over {total} queries, below {MIN_ACCURACY}"
