"""White-box tests of model/train.py: one meta-training step updates every slow-weight group, episode
sizes stay within the recipe, the rate halves on a plateau, runs (one or several episodes a step)
checkpoint and resume exactly, and a CLI smoke run (slow)."""

from __future__ import annotations

import dataclasses
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
from model.checkpoint import WEIGHTS_FILE, load_model
from model.data import EpisodeSampler
from model.train import (
    AVERAGE_FILE,
    STATE_FILE,
    TrainState,
    next_learning_rate,
    sample_episode_size,
    train,
    weight_average,
)
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


def test_way_power_draws_few_class_episodes_as_often_as_n_way_to_its_power():
    cfg = TrainConfig(min_way=5, max_train_way=50, way_power=1.0)
    rng = np.random.default_rng(0)
    ways = np.array([sample_episode_size(cfg, rng, n_drawings=20)[0] for _ in range(20_000)])
    assert ways.min() == 5 and ways.max() == 50
    # P(n) = (1 / n) / sum over 5..50 of 1 / m: 8.2% for 5 classes, 2.0% for 20, 0.8% for 50.
    total = sum(1 / m for m in range(5, 51))
    for way in (5, 20, 50):
        expected = 1 / way / total
        assert abs((ways == way).mean() - expected) < 4 * np.sqrt(expected / len(ways)), way
    # 0 keeps the uniform draw, and the random stream, of a run that never set it.
    uniform, default = TrainConfig(way_power=0.0), TrainConfig()
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    assert [sample_episode_size(uniform, a, 20) for _ in range(50)] == \
        [sample_episode_size(default, b, 20) for _ in range(50)]


def test_a_negative_or_infinite_way_power_is_refused_by_name():
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="way_power must be a finite number, 0 or more"):
            TrainConfig(way_power=bad)


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


def test_the_rate_halves_after_lr_patience_episodes_without_improvement():
    cfg = TrainConfig(lr=1e-3, lr_patience=1000, min_lr=3e-4)
    state = TrainState(step=999, lr=1e-3, improved_step=0)
    assert next_learning_rate(cfg, state) == 1e-3
    state.step = 1000
    assert next_learning_rate(cfg, state) == 5e-4 and state.improved_step == 1000  # patience restarts
    state.lr, state.step = 5e-4, 2000
    assert next_learning_rate(cfg, state) == 3e-4  # never below min_lr
    assert next_learning_rate(TrainConfig(lr=1e-3, lr_patience=0), TrainState(step=10**6, lr=1e-3)) == 1e-3


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



def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint_there(tmp_path, tiny_split, monkeypatch):
    import signal

    import model.train as training

    real_step, calls = training.train_step, []

    def step_then_signal(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # between checkpoints (every 2): the stop must write one of its own
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(training, "train_step", step_then_signal)
    handler = signal.getsignal(signal.SIGINT)
    state = train(_tiny_train_config(50), tmp_path / "run", splits=(tiny_split, tiny_split), progress=False)
    assert state.step == 3 and len(calls) == 3
    assert json.loads((tmp_path / "run" / "last" / STATE_FILE).read_text())["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers before the run are back

    monkeypatch.setattr(training, "train_step", real_step)
    resumed = train(_tiny_train_config(4), tmp_path / "run", splits=(tiny_split, tiny_split), progress=False,
                    resume=True)
    assert resumed.step == 4


def test_the_weight_average_starts_at_the_weights_and_forgets_them_per_episode():
    torch.manual_seed(0)
    model = MetaNet(TINY)
    assert weight_average(model, TrainConfig(model=TINY)) is None  # average_decay 0: none kept
    # 0.5 an episode at two episodes a step: a step keeps a quarter of the average.
    average = weight_average(model, TrainConfig(model=TINY, average_decay=0.5, episodes_per_step=2))
    first = {k: v.clone() for k, v in model.state_dict().items()}
    average.update_parameters(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    average.update_parameters(model)
    averaged = average.module.state_dict()
    for name, param in model.named_parameters():
        torch.testing.assert_close(averaged[name], 0.25 * first[name] + 0.75 * param.detach(), msg=name)
    assert not any(torch.equal(averaged[name], param) for name, param in model.named_parameters())


def test_an_averaging_run_validates_saves_and_resumes_its_average_exactly(tmp_path, tiny_split):
    splits = (tiny_split, tiny_split)

    def averaging(episodes: int) -> TrainConfig:
        return dataclasses.replace(_tiny_train_config(episodes), average_decay=0.7)

    train(averaging(4), tmp_path / "straight", splits=splits, progress=False)
    train(averaging(2), tmp_path / "resumed", splits=splits, progress=False)
    train(averaging(4), tmp_path / "resumed", splits=splits, progress=False, resume=True)
    _same_weights(tmp_path / "straight", tmp_path / "resumed")
    straight = load_file(str(tmp_path / "straight" / "last" / AVERAGE_FILE))
    resumed = load_file(str(tmp_path / "resumed" / "last" / AVERAGE_FILE))
    assert int(resumed["n_averaged"]) == 4
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    weights = load_file(str(tmp_path / "resumed" / "last" / WEIGHTS_FILE))
    assert any(not torch.equal(weights[name], resumed[name]) for name in weights)

    history = [json.loads(line) for line in (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [2, 4]
    assert all(0.0 <= r["val_average"]["mean"] <= 1.0 for r in history)
    saved = json.loads((tmp_path / "resumed" / "average" / "config.json").read_text())
    assert saved["step"] == 4 and saved["val"] == history[-1]["val_average"]
    loaded = load_model(tmp_path / "resumed" / "average").state_dict()
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, resumed[name], rtol=0, atol=0, msg=name)

    # Resumed without averaging, the run drops its average rather than keep a stale one.
    train(_tiny_train_config(6), tmp_path / "resumed", splits=splits, progress=False, resume=True)
    assert not (tmp_path / "resumed" / "last" / AVERAGE_FILE).exists()


def test_an_average_decay_outside_0_to_1_is_refused_by_name():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="average_decay"):
            TrainConfig(average_decay=bad)


def _same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "last" / WEIGHTS_FILE)), load_file(str(b / "last" / WEIGHTS_FILE))
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=0, msg=name)


def test_a_run_of_two_episodes_a_step_checkpoints_and_resumes_exactly(tmp_path, tiny_split):
    splits = (tiny_split, tiny_split)

    def batched(episodes: int) -> TrainConfig:  # uneven episodes too: every shape goes through
        return dataclasses.replace(_tiny_train_config(episodes), episodes_per_step=2, uneven_prob=0.5)

    train(batched(8), tmp_path / "straight", splits=splits, progress=False)
    first = train(batched(4), tmp_path / "resumed", splits=splits, progress=False)
    assert first.step == 4  # episodes, two a step
    second = train(batched(8), tmp_path / "resumed", splits=splits, progress=False, resume=True)
    assert second.step == 8
    _same_weights(tmp_path / "straight", tmp_path / "resumed")
    saved = TrainConfig.from_dict(json.loads((tmp_path / "resumed" / "train_config.json").read_text()))
    assert saved.episodes_per_step == 2
    history = [json.loads(line) for line in (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [2, 4, 6, 8]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["train_acc"] <= 1 for r in history)


def test_a_step_of_three_episodes_validates_and_checkpoints_when_it_passes_a_multiple(tmp_path, tiny_split):
    cfg = dataclasses.replace(_tiny_train_config(7), episodes_per_step=3, val_every=4, checkpoint_every=4)
    state = train(cfg, tmp_path / "run", splits=(tiny_split, tiny_split), progress=False)
    assert state.step == 9  # the last step may pass `episodes`
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [6, 9]  # passed 4 at 6, 8 at 9 (and the end)


def test_one_episode_a_step_trains_with_episode_loss_as_before_batching(tmp_path, tiny_split, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("one episode a step must not take the batched pass")

    monkeypatch.setattr(MetaNet, "batched_episode_loss", refuse)
    state = train(_tiny_train_config(2), tmp_path / "run", splits=(tiny_split, tiny_split), progress=False)
    assert state.step == 2


def test_a_bf16_run_trains_and_keeps_float32_weights(tmp_path, tiny_split):
    cfg = dataclasses.replace(_tiny_train_config(4), episodes_per_step=2, bf16=True)
    state = train(cfg, tmp_path / "run", splits=(tiny_split, tiny_split), progress=False)
    assert state.step == 4
    weights = load_file(str(tmp_path / "run" / "last" / WEIGHTS_FILE))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in history)


def test_an_impossible_augmentation_is_refused_before_any_data_is_read(tmp_path):
    cfg = dataclasses.replace(_tiny_train_config(2), augment_prob=1.5)
    with pytest.raises(ValueError, match="augment prob is a probability, got 1.5"):
        train(cfg, tmp_path / "run", data_dir=tmp_path / "no-such-dir", progress=False)


def test_episodes_per_step_must_be_a_positive_int():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="episodes_per_step must be a positive int"):
            TrainConfig(episodes_per_step=bad)


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
    out = cli("train", "--run-dir", str(run), "--episodes", "4", "--channels", "8", "--augment-prob", "0.25",
              "--augment-pen-max", "6", "--augment-episode-pen", "0.5", "--uneven-prob", "0.5",
              "--way-power", "1", "--average-decay", "0.9", *common)
    assert json.loads(out.splitlines()[-1])["step"] == 4
    assert json.loads((run / "last" / STATE_FILE).read_text())["step"] == 4
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["model"]["channels"] == 8
    assert (saved["augment_prob"], saved["augment_episode_pen"], saved["uneven_prob"]) == (0.25, 0.5, 0.5)
    assert saved["augment_pen_max"] == 6 and saved["way_power"] == 1.0
    assert saved["average_decay"] == 0.9 and (run / "average" / WEIGHTS_FILE).is_file()
    assert saved["episodes_per_step"] == 1

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


def test_cli_training_stopped_by_sigterm_checkpoints_where_it_stopped_and_exits_cleanly(tmp_path):
    import signal
    import time

    data = write_omniglot_npz_dir(tmp_path / "omniglot", seed=0, background=(3, 25), evaluation=(2, 5))
    run = tmp_path / "run"
    env = {**os.environ, "METANET_OMNIGLOT_DIR": str(data), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "train", "--run-dir", str(run), "--episodes", "100000",
         "--channels", "8", "--val-every", "50", "--val-episodes", "2", "--checkpoint-every", "2",
         "--threads", "1", "--no-progress"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "last" / STATE_FILE).is_file():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    step = json.loads(out.splitlines()[-1])["step"]
    assert step < 100000 and json.loads((run / "last" / STATE_FILE).read_text())["step"] == step
    assert f"SIGTERM: stopped at episode {step:,}" in err
