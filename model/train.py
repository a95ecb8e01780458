"""Meta-training on Omniglot background alphabets, with validation, checkpoints and resume.

A run directory holds `train_config.json`, `last/` (weights, Adam state, counters and RNG state,
rewritten every `checkpoint_every` episodes), `best/` (weights with the best validation accuracy,
loadable by `load_model`), `history.jsonl` and `curve.png`. `--resume` continues from `last/`.

With `average_decay` the run also keeps an exponential moving average of the slow weights (in
`last/average.safetensors`), validates it beside the weights themselves and writes it, loadable, to
`average/` at every validation: at a constant rate the weights wander about a minimum, and their
average sits nearer its centre than any one of them (Izmailov et al., 2018, "Averaging weights
leads to wider optima and better generalization").

SIGINT or SIGTERM (Ctrl-C, `kill`) stops a run after the step or validation under way, with a
checkpoint of where it stopped; a second signal stops it at once.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model.augment import Augment
from model.checkpoint import WEIGHTS_FILE, _atomic, load_model, save_weights
from model.config import TrainConfig
from model.data import EpisodeSampler, OmniglotSplit, training_splits
from model.evaluate import evaluate
from model.metanet import MetaNet, read_batched

AVERAGE_FILE = "average.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
# (support_x, support_y, query_x, query_y, n_way, generator) -> (losses, correct), each (B,)
BatchedLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]
STATE_FILE = "state.json"


@dataclass
class TrainState:
    step: int = 0  # episodes trained so far (a step of the optimizer takes cfg.episodes_per_step)
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
    if cfg.way_power == 0:
        n_way = int(rng.integers(cfg.min_way, cfg.max_train_way + 1))
    else:
        ways, probabilities = way_weights(cfg)
        n_way = int(rng.choice(ways, p=probabilities))
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


def way_weights(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The training ways min_way..max_train_way and each one's probability, n_way ** -way_power."""
    ways = np.arange(cfg.min_way, cfg.max_train_way + 1)
    weights = ways.astype(float) ** -cfg.way_power
    return ways, weights / weights.sum()


def next_learning_rate(cfg: TrainConfig, state: TrainState) -> float:
    """The rate after a validation at state.step: halved (to no less than cfg.min_lr) when
    validation has not improved for cfg.lr_patience episodes; else as it was."""
    lr = state.lr if state.lr is not None else cfg.lr
    if cfg.lr_patience > 0 and state.step - state.improved_step >= cfg.lr_patience and lr > cfg.min_lr:
        state.improved_step = state.step  # patience counts again from here
        return max(cfg.min_lr, lr / 2)
    return lr


def passed(before: int, after: int, every: int) -> bool:
    """Did the episode count pass a multiple of `every` going from `before` to `after`? (A step of
    several episodes may jump over the multiple itself.)"""
    return after // every > before // every


def is_batched(cfg: TrainConfig) -> bool:
    """Whether steps run `MetaNet.batched_episode_loss`: with one episode a step and neither bf16
    nor compile they run `episode_loss`, with the random draws of the runs before batching."""
    return cfg.episodes_per_step > 1 or cfg.bf16 or cfg.compile


def batched_loss_fn(model: MetaNet, cfg: TrainConfig) -> BatchedLoss:
    """`model.batched_episode_loss` with the config's bf16 and, with cfg.compile, its query read
    (`model.metanet.read_batched`: u with each episode's Q*, the attention, W* and b) compiled by
    torch.compile; the rest runs eagerly."""
    read = torch.compile(read_batched) if cfg.compile else read_batched
    return functools.partial(model.batched_episode_loss, bf16=cfg.bf16, read=read)


class Step(NamedTuple):
    """One optimizer step: its loss and correct queries as tensors (read only when logged, so a GPU
    is not waited on every step), its queries per episode and its episodes."""

    loss: torch.Tensor  # mean over the episodes of each one's summed query cross-entropy
    correct: torch.Tensor  # correct queries: a count, or one per episode
    queries: int
    episodes: int


def train_step(model: MetaNet, optimizer: torch.optim.Optimizer, sampler: EpisodeSampler,
               rng: np.random.Generator, cfg: TrainConfig, lr: float, loss_fn: BatchedLoss | None,
               size: tuple[int, int | list[int], int] | None = None) -> Step:
    """Draw the step's episode size (unless `size` gives it) and its cfg.episodes_per_step episodes,
    and update the slow weights with their loss (Adam at `lr`, gradient norm clipped at
    cfg.grad_clip). `loss_fn` is `batched_loss_fn(model, cfg)` where `is_batched(cfg)`, else None
    (`episode_loss`)."""
    n_way, shots, n_query = size or sample_episode_size(cfg, rng, sampler.n_drawings)
    if loss_fn is not None:
        episodes = [sampler.sample(rng, n_way, shots, n_query) for _ in range(cfg.episodes_per_step)]
        stack = lambda name: torch.stack([getattr(ep, name) for ep in episodes])  # noqa: E731
        losses, correct = loss_fn(stack("support_x"), stack("support_y"), stack("query_x"),
                                  stack("query_y"), n_way, rng)
        loss = losses.mean()
    else:
        ep = sampler.sample(rng, n_way, shots, n_query)
        loss, correct = model.episode_loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y, n_way, rng)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return Step(loss.detach(), correct, n_way * n_query, cfg.episodes_per_step if loss_fn else 1)


def _window_means(window: list[Step]) -> tuple[float, float]:
    """Mean query cross-entropy and accuracy of the steps' episodes, a step's mean per query."""
    loss = [step.loss.item() / step.queries for step in window]
    acc = [step.correct.sum().item() / (step.queries * step.episodes) for step in window]
    return float(np.mean(loss)), float(np.mean(acc))


def weight_average(model: MetaNet, cfg: TrainConfig) -> AveragedModel | None:
    """The moving average of the model's weights that cfg.average_decay asks for (None at 0): each
    optimizer step moves it (1 - decay ** episodes) of the way to the weights, so its memory is
    counted in episodes whatever the episodes a step. Its first update copies the weights."""
    if cfg.average_decay == 0:
        return None
    decay = cfg.average_decay ** cfg.episodes_per_step
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def augment_of(cfg: TrainConfig) -> Augment:
    return Augment(prob=cfg.augment_prob, rotate=cfg.augment_rotate, shift=cfg.augment_shift,
                   pen_max=cfg.augment_pen_max, low_res=cfg.augment_low_res,
                   episode_pen=cfg.augment_episode_pen)


@dataclass
class _StopRequest:
    """Whether SIGINT or SIGTERM has asked the run to stop (and which)."""

    signal_name: str | None = None


@contextmanager
def _stop_on_signal() -> Iterator[_StopRequest]:
    """Within it, the first SIGINT or SIGTERM only asks the run to stop (the handlers before it
    come back for a second one); outside the main thread, where no handler can be set, nothing."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ask(signum: int, _frame: object) -> None:
        request.signal_name = signal.Signals(signum).name
        for sig, handler in before.items():
            signal.signal(sig, handler)

    for sig in before:
        signal.signal(sig, ask)
    try:
        yield request
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


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
    train_split, val_split = splits or training_splits(data_dir, cfg.split)
    sampler = EpisodeSampler(train_split, rotate=cfg.rotate, device=device, augment=augment)

    model = MetaNet(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    state = TrainState(lr=cfg.lr)
    if resume and (run / "last" / STATE_FILE).is_file():
        state = _load_last(run / "last", model, optimizer, cfg, device)
        before = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
        if before.lr != cfg.lr:  # a new rate asked for: it starts now
            state.lr, state.improved_step = cfg.lr, state.step
        validation = ("val_ways", "val_episodes", "split")
        if any(getattr(before, k) != getattr(cfg, k) for k in validation):
            state.best_val, state.improved_step = -1.0, state.step  # scores no longer compare
    else:
        (run / "history.jsonl").write_text("")
    (run / "train_config.json").write_text(cfg.to_json())
    average = weight_average(model, cfg)  # (a run that turns it on starts it from the weights)
    if average is not None and resume and (run / "last" / AVERAGE_FILE).is_file():
        _load_average(run / "last", average)
    rng = np.random.default_rng(cfg.seed)
    if state.rng_state is not None:
        rng.bit_generator.state = state.rng_state

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.episodes, initial=state.step, unit="episode", dynamic_ncols=True)
    started = time.monotonic()
    window: list[Step] = []  # the steps since the last validation
    loss_fn = batched_loss_fn(model, cfg) if is_batched(cfg) else None
    model.train()
    with _stop_on_signal() as stop:
        while state.step < cfg.episodes and stop.signal_name is None:
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                break
            step = train_step(model, optimizer, sampler, rng, cfg, state.lr, loss_fn)
            window.append(step)
            if average is not None:
                average.update_parameters(model)
            before, state.step = state.step, state.step + step.episodes
            if bar is not None:
                bar.update(step.episodes)
                if state.step // 10 > before // 10:
                    loss, acc = _window_means(window[-50:])
                    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")

            if passed(before, state.step, cfg.val_every) or state.step >= cfg.episodes:
                val = _validate(model, val_split, cfg)
                train_loss, train_acc = _window_means(window)
                record = {
                    "step": state.step,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "lr": state.lr,
                    "val_acc": val["mean"],
                    "val": val,
                    "seconds": state.seconds + time.monotonic() - started,
                }
                if average is not None:
                    record["val_average"] = _validate(average.module, val_split, cfg)
                    save_weights(average.module, run / "average", extra={"trained_max_way": cfg.max_train_way,
                                                                        "step": state.step,
                                                                        "val": record["val_average"]})
                window.clear()
                with open(run / "history.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if val["mean"] > state.best_val:
                    state.best_val, state.improved_step = val["mean"], state.step
                    save_weights(model, run / "best",
                                 extra={"trained_max_way": cfg.max_train_way, "step": state.step, "val": val})
                state.lr = next_learning_rate(cfg, state)
                plot_curve(run)
            if passed(before, state.step, cfg.checkpoint_every):
                _save_last(run / "last", model, optimizer, state, rng, started, average)
    _save_last(run / "last", model, optimizer, state, rng, started, average)
    if stop.signal_name is not None:
        print(f"{stop.signal_name}: stopped at episode {state.step:,}, checkpoint in {run / 'last'} "
              "(--resume continues)", file=sys.stderr, flush=True)
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
               rng: np.random.Generator, started: float, average: AveragedModel | None = None) -> None:
    save_weights(model, directory)
    if average is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in average.module.state_dict().items()}
        tensors["n_averaged"] = average.n_averaged.detach().cpu().reshape(1)
        _atomic(directory / AVERAGE_FILE, lambda tmp: save_file(tensors, str(tmp)))
    else:  # a run that stops averaging drops its average: turned on again, it starts afresh
        (directory / AVERAGE_FILE).unlink(missing_ok=True)
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


def _load_average(directory: Path, average: AveragedModel) -> None:
    tensors = load_file(str(directory / AVERAGE_FILE))
    average.n_averaged.copy_(tensors.pop("n_averaged").reshape(()))
    average.module.load_state_dict(tensors)


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
    # One line per validation setting (a run may add one midway), and its weight average's.
    for key, label in (("val", "validation"), ("val_average", "validation, weight average")):
        settings = sorted({k for r in rows for k in (r.get(key) or {}) if k != "mean"},
                          key=lambda k: int(k.split("-")[0]))
        for setting in settings:
            measured = [r for r in rows if setting in (r.get(key) or {})]
            ax_acc.plot([r["step"] for r in measured], [r[key][setting] for r in measured],
                        marker="o" if key == "val" else ".", label=f"{label}, {setting} 1-shot")
    ax_acc.set(xlabel="episode", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(run / "curve.png", dpi=100)
    plt.close(fig)

