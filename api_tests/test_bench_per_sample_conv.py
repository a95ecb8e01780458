"""bench/per_sample_conv.py at a toy size: both ways of b's per-image convolutions timed layer by
layer, their outputs compared, the record and table; nonsense arguments refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api_tests.helpers import REPO


def conv_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/per_sample_conv.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_a_small_run_times_both_ways_at_every_layer_and_says_which_is_taken(tmp_path: Path) -> None:
    out = tmp_path / "conv.json"
    run = conv_bench("--rounds", "2", "--repeats", "1", "--batches", "1,3", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["map"]) for r in rows] == [
        (n, f"{s}x{s}") for n in (1, 3) for s in (28, 14, 7, 4, 2)]
    assert all(r["grouped_ms"] > 0 and r["columns_ms"] > 0 for r in rows)
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)  # the same convolution either way
    # A single image always takes the grouped way; a batch takes it on the 14x14 and 7x7 maps only.
    batch = ["columns", "grouped", "grouped", "columns", "columns"]
    assert [r["taken"] for r in rows] == ["grouped"] * 5 + batch
    assert "| 3 | 64 -> 64, 14x14 |" in run.stdout and "as taken:" in run.stdout
    assert f"wrote {out}" in run.stdout


@pytest.mark.parametrize(("args", "named"), [
    (["--batches", "0"], "--batches must be between 1 and 256"),
    (["--batches", "16,x"], "--batches takes whole numbers"),
    (["--batches", "100000"], "--batches must be between 1 and 256"),
    (["--rounds", "0"], "--rounds and --repeats must be at least 1"),
    (["--repeats", "-2"], "--rounds and --repeats must be at least 1"),
])
def test_nonsense_arguments_are_refused_with_the_reason(args: list[str], named: str, tmp_path: Path) -> None:
    run = conv_bench(*args, "--out", str(tmp_path / "never.json"))
    assert run.returncode == 2 and named in run.stderr
