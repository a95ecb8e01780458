"""bench/train_throughput.py and bench/gpu_train.py on a CPU at a tiny size: the throughput rows and
their ratios to one episode a step; a GPU command's whole course (probe, bench, training, evaluation,
archive) from scratch and resumed from its own archive, in temporary folders only; nonsense
arguments refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from api_tests.helpers import REPO
from tests.model.omniglot_fixtures import write_omniglot_npz_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Omniglot: 5 background alphabets of 15 characters (a 50-way mix fits), 2 evaluation."""
    return write_omniglot_npz_dir(tmp_path_factory.mktemp("omniglot"), seed=0, background=(5, 15),
                                  evaluation=(2, 10))


def command(script: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "METANET_OMNIGLOT_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_tiny_throughput_run_records_episodes_a_second_and_the_ratio_to_one_a_step(tmp_path, data_dir):
    out = tmp_path / "throughput.json"
    run = command("train_throughput.py", data_dir, "--device", "cpu", "--channels", "8", "--threads", "1",
                  "--steps", "1", "--warmup", "0", "--episodes-per-step", "1,2", "--shapes", "5x1x2,mix",
                  "--modes", "fp32,bf16", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["model"]["channels"] == 8
    rows = result["rows"]
    assert [(r["shape"], r["mode"], r["episodes_per_step"]) for r in rows] == [
        (shape, mode, b) for shape in ("5x1x2", "mix") for mode in ("fp32", "bf16") for b in (1, 2)]
    for r in rows:
        assert r["steps"] == 1 and r["episodes_per_s"] > 0
        assert r["episodes_per_s"] == pytest.approx(r["episodes_per_step"] / r["seconds"], rel=1e-2)
        if r["episodes_per_step"] == 1:
            assert r["vs_b1"] == 1.0
    assert all("vs_fp32_b1" in r for r in rows)
    assert "| mix | bf16 | 2 | 1 |" in run.stdout and f"wrote {out}" in run.stdout


@pytest.mark.parametrize(("args", "named"), [
    (["--episodes-per-step", "0,2"], "--episodes-per-step values must be at least 1"),
    (["--episodes-per-step", "two"], "--episodes-per-step takes comma-separated integers"),
    (["--shapes", "5x1"], "--shapes takes WAYxSHOTxQUERIES or mix"),
    (["--modes", "fp16"], "--modes takes fp32, bf16, compile, bf16+compile"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_nonsense_throughput_arguments_are_refused_with_the_reason(args, named, tmp_path, data_dir):
    run = command("train_throughput.py", data_dir, "--device", "cpu", *args, "--out", str(tmp_path / "x"))
    assert run.returncode == 2 and named in run.stderr


TINY_RUN = ["--device", "cpu", "--channels", "8", "--minutes", "0.1", "--limit-minutes", "2",
            "--episodes-per-step", "2", "--bench-seconds", "2", "--bench-shapes", "5x1x2",
            "--bench-episodes-per-step", "1,2", "--eval-ways", "5,20", "--eval-episodes", "4",
            "--eval-seconds", "30", "--set", "val_every=6", "--set", "val_episodes=2",
            "--set", "checkpoint_every=4", "--set", "max_train_way=6", "--set", "min_way=2"]


def test_the_gpu_command_trains_evaluates_and_archives_a_run_it_can_resume(tmp_path, data_dir):
    first = command("gpu_train.py", data_dir, "--out", str(tmp_path / "first"), "--from-scratch",
                    "--preset", "paper", *TINY_RUN)
    assert first.returncode == 0, first.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert len(files) == 4 and files[0].startswith("gpu-train-") and files[0].endswith("-cpu.json")
    assert files[1:3] == ["gpu-train.log", "run.tar.gz"]
    assert files[3].startswith("train-throughput-") and files[3].endswith("-cpu.json")
    record = json.loads((tmp_path / "first" / files[0]).read_text())
    assert record["start"] == "from scratch, preset paper" and record["recipe"]["model"]["aux_relu"]
    assert record["recipe"]["episodes_per_step"] == 2 and record["episodes_trained"] > 0
    assert set(record["phases"]) == {"load", "probe", "bench", "train", "evaluate"}
    assert record["seconds"] < 120
    five, twenty = record["evaluations"]
    assert (five["way"], five["shot"], five["episodes"], five["seed"]) == (5, 1, 4, 0)
    assert "above the weights' max_way 6" in twenty["skipped"]
    assert "trained" in (tmp_path / "first" / "gpu-train.log").read_text()

    run = tmp_path / "run"
    with tarfile.open(tmp_path / "first" / "run.tar.gz") as tar:
        tar.extractall(run, filter="data")
    assert {"last", "best", "history.jsonl", "train_config.json"} <= {p.name for p in run.iterdir()}
    step = json.loads((run / "last" / "state.json").read_text())["step"]
    assert step == record["state"]["step"]

    second = command("gpu_train.py", data_dir, "--out", str(tmp_path / "second"), "--resume-from", str(run),
                     *TINY_RUN, "--bench-seconds", "0")
    assert second.returncode == 0, second.stderr[-3000:]
    [again] = (tmp_path / "second").glob("gpu-train-*.json")
    resumed = json.loads(again.read_text())
    assert resumed["start"] == f"resumed from {run} at step {step}" and resumed["bench"] is None
    assert resumed["state"]["step"] > step
    assert json.loads((run / "last" / "state.json").read_text())["step"] == step  # the source untouched


def test_the_gpu_command_refuses_a_run_without_a_checkpoint_and_a_bad_setting(tmp_path, data_dir):
    run = command("gpu_train.py", data_dir, "--out", str(tmp_path), "--resume-from", str(tmp_path / "none"))
    assert run.returncode == 2 and "no last/state.json there (or give --from-scratch)" in run.stderr
    run = command("gpu_train.py", data_dir, "--out", str(tmp_path), "--from-scratch", "--set", "colour=1")
    assert run.returncode == 2 and "'colour' is not a TrainConfig field" in run.stderr
