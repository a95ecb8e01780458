"""bench/decode.py at a toy size: both decoders timed on each image kind, the record and table;
nonsense arguments refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api_tests.helpers import REPO


def decode_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/decode.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_a_small_decode_run_times_both_decoders_on_each_kind(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    run = decode_bench("--seconds", "0.05", "--rounds", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [row["kind"] for row in record["rows"]] == ["grey 8-bit", "grey 1-bit", "RGBA canvas"]
    for row in record["rows"]:
        assert all(len(rounds) == 2 for rounds in row["rounds_us"].values())
        best = row["us_per_image"]
        assert set(best) == {"libspng", "Pillow"} and best["libspng"] > 0 and best["Pillow"] > 0
        # the ratio of the unrounded times: within a rounding of that of the rounded ones
        assert row["pillow_over_libspng"] == pytest.approx(best["Pillow"] / best["libspng"], abs=0.02)
    assert "| grey 8-bit |" in run.stdout and f"wrote {out}" in run.stdout


@pytest.mark.parametrize(("args", "named"), [
    (["--seconds", "0"], "--seconds must be more than 0"),
    (["--seconds", "-1"], "--seconds must be more than 0"),
    (["--rounds", "0"], "--rounds at least 1"),
    (["--rounds", "many"], "invalid int value"),
])
def test_nonsense_arguments_are_refused_with_the_reason(args: list[str], named: str, tmp_path: Path) -> None:
    run = decode_bench(*args, "--out", str(tmp_path / "never.json"))
    assert run.returncode == 2 and named in run.stderr
    assert not (tmp_path / "never.json").exists()
