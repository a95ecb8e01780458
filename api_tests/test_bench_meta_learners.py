"""bench/meta_learners.py at a small size: both ways of registration's meta learners on a real
episode's gradients, their outputs compared, the record and table; nonsense arguments refused
with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api_tests.helpers import REPO


def learners_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/meta_learners.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_a_small_run_times_both_ways_of_m_and_d_and_the_whole_registration(tmp_path: Path) -> None:
    out = tmp_path / "learners.json"
    run = learners_bench("--rounds", "1", "--repeats", "1", "--episodes", "2x1,3x2", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["episode"] for r in rows] == ["2-way 1-shot", "3-way 2-shot"]
    for r in rows:
        assert r["register_ms"] > 0
        for name in ("m", "d"):
            assert r[name]["layers_ms"] > 0 and r[name]["blocks_ms"] > 0
            assert r[name]["max_abs_diff"] < 1e-5  # the same learner either way
            training = r[f"{name}_training"]
            assert training["layers_ms"] > 0 and training["blocks_ms"] > 0
            assert training["max_rel_diff"] < 1e-4  # the same gradients either way, to float rounding
    # m sees every coordinate of b for each example; d every coordinate of u once.
    assert rows[1]["m"]["coordinates"] == 3 * rows[0]["m"]["coordinates"]
    assert rows[1]["d"]["coordinates"] == rows[0]["d"]["coordinates"]
    assert "| 3-way 2-shot | whole `register`, as served |" in run.stdout
    assert "| 3-way 2-shot | d, training's forward and backward |" in run.stdout
    assert f"wrote {out}" in run.stdout


@pytest.mark.parametrize(("args", "named"), [
    (["--episodes", "5"], "--episodes takes WAYxSHOT pairs"),
    (["--episodes", "5x1,"], "--episodes takes WAYxSHOT pairs"),
    (["--episodes", "1x1"], "way must be 2 to 20 and shot 1 to 5"),
    (["--episodes", "5x9"], "way must be 2 to 20 and shot 1 to 5"),
    (["--rounds", "0"], "--rounds and --repeats must be at least 1"),
])
def test_nonsense_arguments_are_refused_with_the_reason(args: list[str], named: str, tmp_path: Path) -> None:
    run = learners_bench(*args, "--out", str(tmp_path / "never.json"))
    assert run.returncode == 2 and named in run.stderr
