"""White-box tests of model/train.py: one meta-training step updates every slow-weight group, episode
sizes stay within the recipe, runs checkpoint and resume exactly, and a CLI smoke run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model import MetaNet, TrainConfig
from model.checkpoint import WEIGHTS_FILE
from model.data import EpisodeSampler
from model.train import STATE_FILE, learning_rate, sample_episode_size, train
from tests.model.conftest import TINY
from tests.model.omniglot_fixtures import write_omniglot_npz_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_one_training_step_changes_every_tensor_of_every_slow_weight_group(tiny_split):
    torch.manual_seed(0)
    model = MetaNet(TINY).train()
    groups = model.param_groups()
    assert set(groups) == {"Q", "W", "G", "Z"}
    assert {id(p) for g in groups.values() for p in g} == {id(p) for p in model.parameters()}
    before = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
    aux_before = model.u_aux.clone()

    rng = np.random.default_rng(0)
    ep = EpisodeSampler(tiny_split, rotate=True).sample(rng, n_way=4, n_shot=2, n_query=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, correct = model.episode_loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.n_way, rng)
    assert loss.dim() == 0 and torch.isfinite(loss) and 0 <= int(correct) <= len(ep.query_y)
    loss.backward()
    optimizer.step()

    for name, params in groups.items():
        for i, (p, old) in enumerate(zip(params, before[name], strict=True)):
            assert not torch.equal(p.detach(), old), (
                f"slow weight {name}[{i}] {tuple(p.shape)} did not change"
            )
    assert torch.equal(model.u_aux, aux_before)  # a fixed projection, not a slow weight


def test_episode_loss_is_a_summed_cross_entropy_over_queries(tiny_split):
    torch.manual_seed(0)
    model = MetaNet(TINY)
    ep = EpisodeSampler(tiny_split, rotate=False).sample(
        np.random.default_rng(1), n_way=3, n_shot=1, n_query=4
    )
    loss, _ = model.episode_loss(
        ep.support_x, ep.support_y, ep.query_x, ep.query_y, 3, np.random.default_rng(2)
    )
    # An untrained model is near chance: the sum over 12 queries is about 12 * log(3).
    assert 0.5 * 12 * np.log(3) < loss.item() < 2.0 * 12 * np.log(3)


def test_sample_episode_size_stays_within_the_recipe():
    cfg = TrainConfig()
    rng = np.random.default_rng(0)
    sizes = [sample_episode_size(cfg, rng, n_drawings=20) for _ in range(500)]
    for n_way, n_shot, n_query in sizes:
        assert cfg.min_way <= n_way <= cfg.max_train_way
        assert 1 <= n_shot <= cfg.max_shot and n_way * n_shot <= cfg.model.max_examples
        assert 1 <= n_query <= cfg.query_per_class and n_way * n_query <= cfg.max_queries
        assert n_shot + n_query <= 20
    assert {w for w, _, _ in sizes} == set(range(cfg.min_way, cfg.max_train_way + 1))
    assert {s for _, s, _ in sizes} == set(range(1, cfg.max_shot + 1))


def _tiny_train_config(episodes: int) -> TrainConfig:
    return TrainConfig(
        model=TINY,
        episodes=episodes,
        min_way=2,
        max_train_way=4,
        max_shot=2,
        query_per_class=2,
        val_every=2,
        val_episodes=2,
        val_ways=(4,),
        checkpoint_every=2,
    )


def test_the_rate_halves_on_schedule_counted_from_a_warm_restart():
    cfg = TrainConfig(lr=1e-3, lr_halve_every=1000)
    assert [learning_rate(cfg, s) for s in (0, 999, 1000, 2500)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    restarted = TrainConfig(lr=3e-5, lr_halve_every=3000, lr_schedule_start=24127)
    assert [learning_rate(restarted, s) for s in (24127, 27126, 27127, 30127)] == [3e-5, 3e-5, 1.5e-5, 7.5e-6]
    assert learning_rate(TrainConfig(lr=1e-3, lr_halve_every=0, lr_schedule_start=5), 10**6) == 1e-3
    assert TrainConfig.from_dict(restarted.to_dict()) == restarted


def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, tiny_split):
    splits = (tiny_split, tiny_split)
    train(_tiny_train_config(4), tmp_path / "straight", splits=splits, progress=False)
    first = train(_tiny_train_config(2), tmp_path / "resumed", splits=splits, progress=False)
    assert first.step == 2
    second = train(_tiny_train_config(4), tmp_path / "resumed", splits=splits, progress=False, resume=True)
    assert second.step == 4

    straight = load_file(str(tmp_path / "straight" / "last" / WEIGHTS_FILE))
    resumed = load_file(str(tmp_path / "resumed" / "last" / WEIGHTS_FILE))
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    history = [json.loads(line) for line in (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [2, 4]
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in history)
    assert (tmp_path / "resumed" / "curve.png").is_file()
    assert json.loads((tmp_path / "resumed" / "best" / "config.json").read_text())["step"] in (2, 4)



def test_a_jittered_run_trains_saves_its_jitter_and_resumes_exactly(tmp_path, tiny_split):
    import dataclasses

    splits = (tiny_split, tiny_split)

    def jittered(episodes):
        return dataclasses.replace(_tiny_train_config(episodes), jitter_shift=2.0, jitter_rotate=10.0,
                                   jitter_scale=0.1, jitter_prob=0.5)

    train(jittered(4), tmp_path / "straight", splits=splits, progress=False)
    train(jittered(2), tmp_path / "resumed", splits=splits, progress=False)
    train(jittered(4), tmp_path / "resumed", splits=splits, progress=False, resume=True)
    saved = TrainConfig.from_dict(json.loads((tmp_path / "resumed" / "train_config.json").read_text()))
    jitter = (saved.jitter_shift, saved.jitter_rotate, saved.jitter_scale, saved.jitter_prob)
    assert jitter == (2, 10, 0.1, 0.5)
    straight = load_file(str(tmp_path / "straight" / "last" / WEIGHTS_FILE))
    resumed = load_file(str(tmp_path / "resumed" / "last" / WEIGHTS_FILE))
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    # A config saved before the jitter existed loads as "no jitter".
    old = {k: v for k, v in saved.to_dict().items() if not k.startswith("jitter_")}
    assert TrainConfig.from_dict(old).jitter_shift == 0.0


def test_an_impossible_jitter_is_refused_before_any_data_is_read(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(_tiny_train_config(2), jitter_scale=1.5)
    with pytest.raises(ValueError, match="jitter scale must be below 1, got 1.5"):
        train(cfg, tmp_path / "run", data_dir=tmp_path / "no-such-dir", progress=False)


@pytest.mark.slow
def test_cli_trains_resumes_and_evaluates_a_tiny_run(tmp_path):
    data = write_omniglot_npz_dir(tmp_path / "omniglot", seed=0, background=(3, 25), evaluation=(2, 5))
    run = tmp_path / "run"
    env = {**os.environ, "METANET_OMNIGLOT_DIR": str(data), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    common = [
        "--val-every",
        "2",
        "--val-episodes",
        "2",
        "--checkpoint-every",
        "2",
        "--threads",
        "1",
        "--no-progress",
    ]
    out = cli("train", "--run-dir", str(run), "--episodes", "4", "--channels", "8", "--jitter-shift", "1.5",
              "--jitter-prob", "0.25", *common)
    assert json.loads(out.splitlines()[-1])["step"] == 4
    assert json.loads((run / "last" / STATE_FILE).read_text())["step"] == 4
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["model"]["channels"] == 8
    assert (saved["jitter_shift"], saved["jitter_prob"], saved["jitter_rotate"]) == (1.5, 0.25, 0.0)

    # --resume reuses the run's saved config (8 channels) without being told again.
    out = cli("train", "--run-dir", str(run), "--resume", "--episodes", "6", *common)
    assert json.loads(out.splitlines()[-1])["step"] == 6
    assert json.loads((run / "last" / STATE_FILE).read_text())["step"] == 6
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [2, 4, 6]
    assert history[-1]["seconds"] >= history[1]["seconds"]
    assert (run / "best" / WEIGHTS_FILE).is_file() and (run / "curve.png").is_file()

    result = json.loads(
        cli("evaluate", "--weights", str(run / "best"), "--way", "5", "--episodes", "3", "--json")
    )
    assert (result["way"], result["shot"], result["episodes"]) == (5, 1, 3)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["ci95"] >= 0.0
    assert result["model_version"].startswith("metanet-")
