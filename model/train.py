"""Meta-training on Omniglot background alphabets, with validation, checkpoints and resume.

A run directory holds `train_config.json`, `last/` (weights, Adam state, counters and RNG state,
rewritten every `checkpoint_every` episodes), `best/` (weights with the best validation accuracy,
loadable by `load_model`), `history.jsonl` and `curve.png`. `--resume` continues from `last/`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.augment import Augment
from model.checkpoint import WEIGHTS_FILE, _atomic, load_model, save_weights
from model.config import TrainConfig
from model.data import EpisodeSampler, OmniglotSplit, load_split, train_val_split
from model.evaluate import evaluate
from model.metanet import MetaNet

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    step: int = 0
    best_val: float = -1.0
    rng_state: dict[str, Any] | None = None
    seconds: float = 0.0
    lr: float | None = None  # the current rate (None: the config's)
    improved_step: int = 0  # the last step at which validation improved, or the rate changed


def sample_episode_size(
    cfg: TrainConfig, rng: np.random.Generator, n_drawings: int
) -> tuple[int, int | list[int], int]:
    """(n_way, shots, n_query) for one training episode: a range of sizes serves every task.
    shots is one number for every class, or (uneven episodes) a list of one per class."""
    n_way = int(rng.integers(cfg.min_way, cfg.max_train_way + 1))
    # At most 60 support examples, as a 20-way 3-shot task: the cost of an episode grows with them.
    most = max(1, min(cfg.max_shot, cfg.model.max_examples // n_way, 60 // n_way))
    shots: int | list[int] = 1
    if rng.random() < cfg.multi_shot_prob:
        shots = max(1, min(int(rng.integers(2, cfg.max_shot + 1)), most))
    if cfg.uneven_prob > 0 and rng.random() < cfg.uneven_prob and most > 1:
        shots = [int(k) for k in rng.integers(1, most + 1, n_way)]
    biggest = shots if isinstance(shots, int) else max(shots)
    n_query = max(1, min(cfg.query_per_class, cfg.max_queries // n_way, n_drawings - biggest))
    return n_way, shots, n_query


def next_learning_rate(cfg: TrainConfig, state: TrainState) -> float:
    """The rate after a validation at state.step: halved (to no less than cfg.min_lr) when
    validation has not improved for cfg.lr_patience episodes; else as it was."""
    lr = state.lr if state.lr is not None else cfg.lr
    if cfg.lr_patience > 0 and state.step - state.improved_step >= cfg.lr_patience and lr > cfg.min_lr:
        state.improved_step = state.step  # patience counts again from here
        return max(cfg.min_lr, lr / 2)
    return lr


def augment_of(cfg: TrainConfig) -> Augment:
    return Augment(prob=cfg.augment_prob, rotate=cfg.augment_rotate, shift=cfg.augment_shift,
                   pen_max=cfg.augment_pen_max, low_res=cfg.augment_low_res)


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    resume: bool = False,
    max_seconds: float | None = None,
    progress: bool = True,
    splits: tuple[OmniglotSplit, OmniglotSplit] | None = None,
) -> TrainState:
    """Meta-train until `cfg.episodes` (or `max_seconds` of this call) and checkpoint as it goes."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    augment = augment_of(cfg)  # built before the data is read: bad settings are refused at once
    train_split, val_split = splits or train_val_split(load_split(data_dir, "background"))
    sampler = EpisodeSampler(train_split, rotate=cfg.rotate, device=device, augment=augment)

    model = MetaNet(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    state = TrainState(lr=cfg.lr)
    if resume and (run / "last" / STATE_FILE).is_file():
        state = _load_last(run / "last", model, optimizer, cfg, device)
        before = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
        if before.lr != cfg.lr:  # a new rate asked for: it starts now
            state.lr, state.improved_step = cfg.lr, state.step
        if (before.val_ways, before.val_episodes) != (cfg.val_ways, cfg.val_episodes):
            state.best_val, state.improved_step = -1.0, state.step  # scores no longer compare
    else:
        (run / "history.jsonl").write_text("")
    (run / "train_config.json").write_text(cfg.to_json())
    rng = np.random.default_rng(cfg.seed)
    if state.rng_state is not None:
        rng.bit_generator.state = state.rng_state

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.episodes, initial=state.step, unit="episode", dynamic_ncols=True)
    started = time.monotonic()
    window_loss: list[float] = []
    window_acc: list[float] = []
    model.train()
    while state.step < cfg.episodes:
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            break
        n_way, shots, n_query = sample_episode_size(cfg, rng, sampler.n_drawings)
        ep = sampler.sample(rng, n_way, shots, n_query)
        loss, correct = model.episode_loss(
            ep.support_x, ep.support_y, ep.query_x, ep.query_y, n_way, rng
        )
        for group in optimizer.param_groups:
            group["lr"] = state.lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        state.step += 1
        window_loss.append(loss.item() / len(ep.query_y))
        window_acc.append(correct.item() / len(ep.query_y))
        if bar is not None:
            bar.update(1)
            if state.step % 10 == 0:
                bar.set_postfix(
                    loss=f"{np.mean(window_loss[-50:]):.3f}", acc=f"{np.mean(window_acc[-50:]):.3f}"
                )

        if state.step % cfg.val_every == 0 or state.step == cfg.episodes:
            val = _validate(model, val_split, cfg)
            record = {
                "step": state.step,
                "train_loss": float(np.mean(window_loss)),
                "train_acc": float(np.mean(window_acc)),
                "lr": state.lr,
                "val_acc": val["mean"],
                "val": val,
                "seconds": state.seconds + time.monotonic() - started,
            }
            window_loss.clear()
            window_acc.clear()
            with open(run / "history.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if val["mean"] > state.best_val:
                state.best_val, state.improved_step = val["mean"], state.step
                save_weights(model, run / "best",
                             extra={"trained_max_way": cfg.max_train_way, "step": state.step, "val": val})
            state.lr = next_learning_rate(cfg, state)
            plot_curve(run)
        if state.step % cfg.checkpoint_every == 0:
            _save_last(run / "last", model, optimizer, state, rng, started)
    _save_last(run / "last", model, optimizer, state, rng, started)
    if not (run / "best" / WEIGHTS_FILE).exists():
        save_weights(model, run / "best",
                     extra={"trained_max_way": cfg.max_train_way, "step": state.step, "val": None})
    if bar is not None:
        bar.close()
    return state


def _validate(model: MetaNet, val_split: OmniglotSplit, cfg: TrainConfig) -> dict[str, float]:
    """1-shot accuracy per `cfg.val_ways` on the same seeded episodes every time, so values
    compare; "mean" over the settings selects the best weights."""
    model.eval()
    scores = {}
    for way in cfg.val_ways:
        way = min(way, cfg.model.max_way, len(val_split.images))
        result = evaluate(model, val_split, way=way, shot=1, episodes=cfg.val_episodes, seed=1234)
        scores[f"{way}-way"] = result.accuracy
    model.train()
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def _save_last(directory: Path, model: MetaNet, optimizer: torch.optim.Optimizer, state: TrainState,
               rng: np.random.Generator, started: float) -> None:
    save_weights(model, directory)
    opt_state = optimizer.state_dict()
    tensors = {
        f"{idx}.{key}": (
            value.detach().cpu().reshape(-1) if key == "step" else value.detach().cpu().contiguous()
        )
        for idx, per_param in opt_state["state"].items()
        for key, value in per_param.items()
    }
    _atomic(directory / OPTIMIZER_FILE, lambda tmp: save_file(tensors, str(tmp)))
    record = {
        "step": state.step,
        "best_val": state.best_val,
        "rng_state": rng.bit_generator.state,
        "seconds": state.seconds + time.monotonic() - started,
        "lr": state.lr,
        "improved_step": state.improved_step,
        "param_groups": opt_state["param_groups"],
    }
    _atomic(directory / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(record)))


def _load_last(directory: Path, model: MetaNet, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
               device: str) -> TrainState:
    loaded = load_model(directory, device)
    model.load_state_dict(loaded.state_dict())
    record = json.loads((directory / STATE_FILE).read_text())
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        per_param.setdefault(int(idx), {})[key] = value.reshape(()) if key == "step" else value.to(device)
    optimizer.load_state_dict({"state": per_param, "param_groups": record["param_groups"]})
    return TrainState(record["step"], record["best_val"], record["rng_state"], record["seconds"],
                      record.get("lr", record["param_groups"][0]["lr"]),
                      record.get("improved_step", record["step"]))


def plot_curve(run: Path) -> None:
    """history.jsonl -> curve.png: training loss and accuracy, validation accuracy."""
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["train_loss"] for r in rows])
    ax_loss.set(xlabel="episode", ylabel="query cross-entropy", title="training loss", yscale="log")
    ax_acc.plot(steps, [r["train_acc"] for r in rows], label="train (mixed way/shot)")
    measured = [r for r in rows if r.get("val_acc") is not None]
    ax_acc.plot([r["step"] for r in measured], [r["val_acc"] for r in measured], marker="o",
                label="validation, mean of 1-shot settings")
    ax_acc.set(xlabel="episode", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(run / "curve.png", dpi=100)
    plt.close(fig)

