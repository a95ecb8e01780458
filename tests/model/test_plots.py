"""White-box tests of model/plots.py: accuracy against n_way as a PNG, one line per n_shot."""

from __future__ import annotations

import pytest
from PIL import Image

from model.evaluate import EvalResult
from model.plots import plot_accuracy


def result(way: int, shot: int, accuracy: float, ci95: float | None = 0.02) -> EvalResult:
    return EvalResult(way, shot, episodes=10, queries_per_class=5, accuracy=accuracy, ci95=ci95, seed=0)


def test_plot_accuracy_writes_a_png(tmp_path):
    results = [result(5, 1, 0.95), result(20, 1, 0.85), result(5, 5, 0.99), result(20, 5, 0.93, None)]
    path = plot_accuracy(results, tmp_path / "plots" / "accuracy.png", title="tiny")
    assert path == tmp_path / "plots" / "accuracy.png"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 400 and img.height > 300
        # Something was drawn: not a blank canvas.
        assert len(img.convert("L").getcolors(maxcolors=1 << 16) or ()) > 10


def test_plot_accuracy_refuses_no_results(tmp_path):
    with pytest.raises(ValueError, match="no results"):
        plot_accuracy([], tmp_path / "empty.png")
