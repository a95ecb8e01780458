"""bench/forward.py at a toy size: this code and the formulation it replaced timed on both backends,
their probabilities compared, the record and table; nonsense arguments refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api_tests.helpers import REPO


def forward_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/forward.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_a_small_forward_run_times_both_versions_on_both_backends(tmp_path: Path) -> None:
    out = tmp_path / "forward.json"
    run = forward_bench("--rounds", "2", "--repeats", "1", "--batches", "1,3", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [(r["backend"], r["batch"]) for r in record["rows"]] == [
        ("torch", 1), ("torch", 3), ("onnx", 1), ("onnx", 3)]
    for row in record["rows"]:
        assert all(len(rounds) == 2 for rounds in row["rounds_ms"].values())
        ms = row["ms"]
        assert ms["this code"] > 0 and ms["before"] > 0
        assert row["before_over_this"] == pytest.approx(ms["before"] / ms["this code"], abs=2e-3)
        # The same model either way: probabilities agree to float32 rounding.
        assert row["max_abs_prob_diff"] < 1e-5
    assert [row["input"][-1] for row in record["pooling"]] == [28, 14, 7, 4, 2]
    assert all(row["us"]["this code"] > 0 and row["us"]["before"] > 0 for row in record["pooling"])
    assert "| torch | 3 |" in run.stdout and "| 16x64x28x28 |" in run.stdout and f"wrote {out}" in run.stdout


@pytest.mark.parametrize(("args", "named"), [
    (["--batches", "0"], "--batches must be between 1 and"),
    (["--batches", "16,x"], "--batches takes whole numbers"),
    (["--batches", "100000"], "--batches must be between 1 and"),
    (["--backends", "tensorrt"], "--backends takes torch, onnx or both"),
    (["--rounds", "0"], "--rounds and --repeats must be at least 1"),
    (["--repeats", "-2"], "--rounds and --repeats must be at least 1"),
])
def test_nonsense_arguments_are_refused_with_the_reason(args: list[str], named: str, tmp_path: Path) -> None:
    run = forward_bench(*args, "--out", str(tmp_path / "never.json"))
    assert run.returncode == 2 and named in run.stderr
    assert not (tmp_path / "never.json").exists()
