"""bench/forward.py at a toy size: the forward timed on both backends, the record and table;
nonsense arguments refused with the reason."""

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


def test_a_small_forward_run_times_each_batch_on_both_backends(tmp_path: Path) -> None:
    out = tmp_path / "forward.json"
    run = forward_bench("--rounds", "2", "--repeats", "1", "--batches", "1,3", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [(r["backend"], r["batch"]) for r in record["rows"]] == [
        ("torch", 1), ("torch", 3), ("onnx", 1), ("onnx", 3)]
    for row in record["rows"]:
        assert len(row["rounds_ms"]) == 2 and row["ms"] == min(row["rounds_ms"]) > 0
        assert row["images_per_s"] == pytest.approx(1e3 * row["batch"] / row["ms"], rel=1e-2)
    assert "| torch | 3 |" in run.stdout and f"wrote {out}" in run.stdout


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
