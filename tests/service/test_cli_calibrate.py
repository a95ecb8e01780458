"""`metanet calibrate`: fits a temperature per number of classes on the validation alphabets and saves
the table into the weights (a new version), on a tiny model and tiny synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from model import MetaNet
from model.checkpoint import load_model, save_weights
from service.cli import main
from tests.model.conftest import TINY
from tests.model.omniglot_fixtures import write_omniglot_npz_dir


def test_calibrate_saves_a_temperature_per_class_count_and_reports_the_ece(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    weights = save_weights(MetaNet(TINY), tmp_path / "weights", extra={"step": 3})
    before = load_model(weights).version
    # 30 background alphabets of 6 characters: the 4 held out for validation hold 24 characters.
    data = write_omniglot_npz_dir(tmp_path / "omniglot", seed=0, background=(30, 6), evaluation=(1, 2),
                                  n_drawings=8, size=28)
    threads = torch.get_num_threads()
    try:
        assert main(["calibrate", "--weights", str(weights), "--data-dir", str(data), "--episodes", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    meta = json.loads((weights / "config.json").read_text())
    assert meta["step"] == 3  # the rest of the config is kept
    fitted = meta["calibration"]["temperatures"]
    # TINY takes at most 6 classes and 12 examples: the fitting kinds of 2 and 5 classes that fit.
    assert list(fitted) == ["2", "5"]
    assert set(meta["calibration"]["ece_after"]) == {"2-way 1-shot", "5-way 1-shot",
                                                    "5-way 1-shot within one alphabet", "all"}
    model = load_model(weights)
    assert model.version != before
    table = model.temperature
    assert table.shape == (TINY.max_way + 1,) and (table > 0).all()
    for way, value in fitted.items():
        assert math.isclose(float(table[int(way)]), value, rel_tol=1e-3)
    assert float(table[0]) == float(table[1]) == float(table[2]) and float(table[6]) == float(table[5])
    assert float(table[3]) != float(table[2]) or fitted["2"] == fitted["5"]  # between: interpolated
    assert "temperatures by number of classes" in out and "5-way 1-shot within one alphabet" in out
