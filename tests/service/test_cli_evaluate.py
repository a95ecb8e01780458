"""`metanet evaluate`: one N-way K-shot point, or with --plot a grid of them, its table and the PNG;
--m-dtype. Run on a tiny model and tiny synthetic data (never the shipped weights on real Omniglot:
too slow for a test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from model import MetaNet
from model.checkpoint import save_weights
from service.cli import main
from tests.model.conftest import TINY
from tests.model.omniglot_fixtures import write_omniglot_npz_dir


@pytest.fixture
def tiny_setup(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    weights = save_weights(MetaNet(TINY), tmp_path / "weights")
    data = write_omniglot_npz_dir(tmp_path / "omniglot", seed=0, background=(1, 2), evaluation=(2, 4),
                                  n_drawings=6, size=28)
    return weights, data


def run(tiny_setup: tuple[Path, Path], *args: str) -> int:
    weights, data = tiny_setup
    threads = torch.get_num_threads()
    try:
        return main(["evaluate", "--weights", str(weights), "--data-dir", str(data), "--episodes", "2",
                     "--queries", "2", *args])
    finally:
        torch.set_num_threads(threads)


def test_evaluate_plot_prints_the_grid_and_writes_a_png(tiny_setup, tmp_path, capsys):
    png = tmp_path / "out" / "accuracy.png"
    assert run(tiny_setup, "--plot", str(png), "--ways", "2,4,8", "--shots", "1,2") == 0
    out = capsys.readouterr().out
    assert "n_way n_shot" in out
    for way, shot in ((2, 1), (2, 2), (4, 1), (4, 2)):
        assert any(line.split()[:2] == [str(way), str(shot)] for line in out.splitlines()), out
    assert "skipped 8-way 1-shot: the model takes at most max_way=6 classes" in out
    with Image.open(png) as img:
        assert img.format == "PNG"


def test_evaluate_plot_as_json(tiny_setup, tmp_path, capsys):
    png = tmp_path / "accuracy.png"
    assert run(tiny_setup, "--plot", str(png), "--ways", "2,3", "--shots", "1", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plot"] == str(png) and png.is_file()
    assert [(r["way"], r["shot"], r["episodes"]) for r in report["results"]] == [(2, 1, 2), (3, 1, 2)]
    assert report["skipped"] == []


def test_evaluate_plot_with_no_point_that_fits_is_an_error(tiny_setup, tmp_path, capsys):
    assert run(tiny_setup, "--plot", str(tmp_path / "x.png"), "--ways", "7", "--shots", "1") == 2
    assert "no point of the grid fits" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_evaluate_json_says_which_dtype_m_was_held_in(tiny_setup, capsys):
    assert run(tiny_setup, "--way", "3", "--json") == 0
    assert json.loads(capsys.readouterr().out)["m_dtype"] == "float32"
    assert run(tiny_setup, "--way", "3", "--m-dtype", "bfloat16", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["m_dtype"] == "bfloat16"
    assert (report["way"], report["episodes"]) == (3, 2) and 0.0 <= report["accuracy"] <= 1.0


def test_evaluate_names_the_m_dtype_in_its_summary_line(tiny_setup, capsys):
    assert run(tiny_setup, "--way", "2", "--m-dtype", "float16") == 0
    assert "2-way 1-shot over 2 episodes, M in float16: " in capsys.readouterr().out


def test_evaluate_grid_json_says_which_dtype_m_was_held_in(tiny_setup, tmp_path, capsys):
    assert run(tiny_setup, "--plot", str(tmp_path / "a.png"), "--ways", "2", "--shots", "1",
               "--m-dtype", "float16", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["m_dtype"] == "float16" and [r["m_dtype"] for r in report["results"]] == ["float16"]


def test_evaluate_on_the_423_test_characters_says_which_the_data_set_lacks(tiny_setup, capsys):
    assert run(tiny_setup, "--way", "3", "--test-set", "423") == 2
    err = capsys.readouterr().err
    assert "the 1,200 / 423 split names 595 characters the data set lacks" in err and "Traceback" not in err


def test_evaluate_refuses_an_unknown_m_dtype(tiny_setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_setup, "--m-dtype", "float64")
    assert exit_info.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["evaluate"], ["export-onnx", "--out", "graph.onnx"]])
def test_missing_or_broken_weights_are_a_one_line_error_not_a_traceback(command, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    broken = tmp_path / "broken"
    broken.mkdir()
    shipped = Path(__file__).resolve().parents[2] / "model" / "weights"
    (broken / "config.json").write_text((shipped / "config.json").read_text())
    (broken / "metanet.safetensors").write_bytes(b"not safetensors")
    for weights, named in ((missing, "is missing"), (broken, "is not a readable safetensors file")):
        assert main([*command, "--weights", str(weights)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"metanet {command[0]}: error: ") and named in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err
