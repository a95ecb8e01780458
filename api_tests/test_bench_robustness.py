"""bench/robustness.py's smoke run: every part runs on the shipped weights through the service's
input transform and lands in the record and the table; nonsense arguments are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from api_tests.helpers import REPO


def robustness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/robustness.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
def test_the_quick_run_measures_every_condition_uneven_set_calibration_and_digits(tmp_path: Path) -> None:
    out = tmp_path / "robustness.json"
    run = robustness("--quick", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["conditions"]) == [
        "plain", "inverted polarity", "small in the frame (40%)", "off-centre (half size in a corner)",
        "thick pen", "thin pen", "fine pen (1-pixel strokes)",
        "fine pen on a 4x canvas (1-pixel strokes at 420x420)", "turned up to 15 degrees", "sent at 28x28",
        "photographed on unevenly lit paper (JPEG)", "scanned with dust (three 2x2 specks)", "mixed"]
    for row in result["conditions"].values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and 0 <= row["support_self"] <= 1
        assert row["episodes"] == 2
    # Inverted polarity is the same images to the model: the same answers as plain.
    assert result["conditions"]["inverted polarity"]["accuracy"] == result["conditions"]["plain"]["accuracy"]
    assert set(result["uneven"]) == {"5-way, one class of 3", "20-way, one class of 3"}
    for row in result["uneven"].values():
        assert 0 <= row["uneven_one_shot"]["accuracy"] <= 1 and 0 <= row["heavy_class_accuracy"] <= 1
    assert set(result["calibration"]) == {"5-way 1-shot", "5-way 1-shot within one alphabet"}
    assert 0 <= result["digits_10way_1shot"]["accuracy"] <= 1
    assert result["command"] == f"python bench/robustness.py --quick --out {out}"
    assert "| mixed |" in run.stdout and "scikit-learn digits, 10-way 1-shot" in run.stdout


@pytest.mark.parametrize(("args", "named"), [
    (["--episodes", "1"], "--episodes must be at least 2"),
    (["--way", "51"], "--way must be 2 to 50"),
    (["--stroke", "bold"], "--stroke: invalid choice"),
    (["--alphabets", "test"], "--alphabets: invalid choice"),
    (["--fine", "0.1", "--pen", "0.05"], "0 <= fine <= pen <= 1"),
])
def test_nonsense_arguments_are_refused_with_the_reason(args: list[str], named: str, tmp_path: Path) -> None:
    run = robustness(*args, "--out", str(tmp_path / "never.json"))
    assert run.returncode == 2 and named in run.stderr


def l_shape(side: int, stroke: int) -> np.ndarray:
    """An L of the given stroke width, 2/3 of a side x side frame long, ink = 1."""
    ink = np.zeros((side, side), np.float32)
    top, left, length = side // 10, side // 5, 2 * side // 3
    ink[top : top + length, left : left + stroke] = 1
    ink[top + length - stroke : top + length, left : left + length] = 1
    return ink


def test_stroke_normalisation_erodes_a_wide_pen_to_omniglots_width_and_leaves_a_thin_one(monkeypatch) -> None:
    from bench import robustness as bench

    monkeypatch.setattr(bench, "STROKE_TO_EXTENT", [0.1])  # Omniglot's median is about 0.105
    wide, thin = l_shape(105, 12), l_shape(105, 3)
    width_before, extent, _ = bench.stroke(wide.astype(bool))
    width_after, _, _ = bench.stroke(bench.thinned_to_omniglot(wide)[0].astype(bool))
    assert width_before > 1.5 * 0.1 * extent and width_after <= 0.1 * extent + 2
    np.testing.assert_array_equal(bench.thinned_to_omniglot(thin)[0], thin)
    # A glyph sent small is enlarged to Omniglot's size first, then eroded the same way.
    small = bench.thinned_to_omniglot(l_shape(32, 4))[0]
    assert small.shape == (96, 96)
    width_before, extent, _ = bench.stroke(l_shape(96, 12).astype(bool))  # the L enlarged 3 times
    width_after, _, _ = bench.stroke(small.astype(bool))
    assert width_before > 1.5 * 0.1 * extent and width_after <= 0.1 * extent + 2


def test_fine_zero_frames_a_fine_pen_as_drawn_and_the_default_widens_it(monkeypatch) -> None:
    from bench import robustness as bench
    from model.transform import frame

    fine = np.stack([l_shape(420, 1)])
    greys = (255 * (1 - fine)).astype(np.uint8)
    widened = bench.framed(greys)
    np.testing.assert_allclose(widened, frame(np.stack([l_shape(420, 1)])), atol=1e-5)
    monkeypatch.setitem(bench.FRAMING, "fine", 0.0)
    as_drawn = bench.framed(greys)
    assert (as_drawn > 0.5).sum() < (widened > 0.5).sum() / 2  # a line one input pixel wide, or less


def test_a_flat_strokes_width_is_measured_as_drawn() -> None:
    from bench.robustness import stroke

    width, extent, _ = stroke(l_shape(105, 12).astype(bool))
    assert extent == 70 and 10 <= width <= 14


@pytest.mark.slow
def test_stroke_widths_grow_with_the_pen_and_place_the_digits_among_them(tmp_path: Path) -> None:
    out = tmp_path / "widths.json"
    run = subprocess.run([sys.executable, "bench/stroke_widths.py", "--drawings", "40", "--pens", "1,3,6",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["width_over_longer_side"]
    names = ("robustness: thin pen", "Omniglot as drawn", "training pen 1", "training pen 3",
             "training pen 6")
    medians = [rows[name]["median"] for name in names]
    assert medians == sorted(medians) and len(set(medians)) == len(medians)
    # Coarse 8x8 digits have strokes wider than a 3-pixel pen makes Omniglot's, within a 6-pixel one.
    assert rows["training pen 3"]["median"] < rows["scikit-learn digits (32x32)"]["median"]
    assert rows["scikit-learn digits (32x32)"]["median"] < rows["training pen 6"]["median"]
    assert "| scikit-learn digits (32x32) |" in run.stdout


@pytest.mark.parametrize("alphabets", ["evaluation", "validation"])
def test_alphabets_picks_the_characters_the_tasks_are_drawn_from(alphabets: str, tmp_path: Path,
                                                                 monkeypatch, capsys) -> None:
    from bench import robustness as bench
    from model.data import load_split, training_splits

    expected = (training_splits(None)[1] if alphabets == "validation" else load_split(None, "evaluation")).raw
    seen: list[np.ndarray] = []

    def conditions(model, raw, way, episodes, seed, names):  # noqa: ANN001, ANN202  (the real signature)
        seen.append(raw)
        return {name: {"accuracy": 0.5, "ci95": 0.0, "ece": 0.0, "support_self": 1.0, "tasks_warned": 0.0}
                for name in names}

    monkeypatch.setattr(bench, "run_conditions", conditions)
    out = tmp_path / "record.json"
    assert bench.main(["--parts", "conditions", "--conditions", "plain", "--alphabets", alphabets,
                       "--out", str(out)]) == 0
    assert len(seen) == 1 and np.array_equal(seen[0], expected)
    result = json.loads(out.read_text())
    assert result["alphabets"] == alphabets
    assert f"{alphabets} alphabets)" in capsys.readouterr().out
