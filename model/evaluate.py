"""N-way K-shot evaluation on held-out alphabets: mean accuracy and a 95% confidence interval, and
the expected calibration error of the answers' confidence, at one (way, shot) point or over a grid.

Episodes go through the public `register` / `classify` API with string labels, the way the service
uses the model; `m_dtype` holds each task's M in float16 or bfloat16 between the two, as the service
can (`METANET_M_DTYPE`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.calibrate import TaskKind, expected_calibration_error, sample_task
from model.data import EpisodeSampler, OmniglotSplit
from model.metanet import MetaNet

# The dtypes a task's M may be held in, by the names the command line and the service use.
M_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EvalResult:
    way: int
    shot: int
    episodes: int
    queries_per_class: int
    accuracy: float
    ci95: float | None  # None for a single episode: no spread to measure
    seed: int
    m_dtype: str = "float32"  # the dtype M was held in between register and classify
    ece: float | None = None  # expected calibration error of the answers (10 bins)
    within_alphabet: bool = False  # each task's classes drawn from one alphabet

    def to_dict(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


def evaluate(
    model: MetaNet,
    split: OmniglotSplit,
    *,
    way: int,
    shot: int,
    episodes: int,
    seed: int = 0,
    queries_per_class: int = 5,
    m_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    within_alphabet: bool = False,
) -> EvalResult:
    """Mean per-episode accuracy over seeded episodes (no rotations at test time), each task's M
    converted to `m_dtype` after registration; `within_alphabet` draws each task's classes from one
    alphabet (harder: its characters look alike)."""
    if episodes < 1:
        raise ValueError("episodes must be at least 1")
    dtype_name = _m_dtype_name(m_dtype)
    device = next(model.parameters()).device
    sampler = EpisodeSampler(split, rotate=False, device=device)
    kind = TaskKind(f"{way}-way {shot}-shot", way, shot, within_alphabet=True)
    rng = np.random.default_rng(seed)
    names = [f"class-{k}" for k in range(way)]
    accuracies = np.empty(episodes)
    confidences, corrects = [], []
    steps = range(episodes)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"{way}-way {shot}-shot", unit="episode")
    for e in steps:
        if within_alphabet:
            support_x, support_y, query_x, query_y = sample_task(split, kind, rng, queries_per_class, device)
        else:
            ep = sampler.sample(rng, way, shot, queries_per_class)
            support_x, support_y, query_x, query_y = ep.support_x, ep.support_y, ep.query_x, ep.query_y
        memory = model.register(support_x, [names[int(k)] for k in support_y])
        if m_dtype != torch.float32:  # register builds M in float32, the model's own dtype
            memory = memory.with_m_dtype(m_dtype)
        probs = model.classify(memory, query_x).probs.cpu()
        confidence, best = probs.max(dim=1)
        # memory.labels lists names in first-appearance order, which is class-0, class-1, ...
        predicted = torch.tensor([int(memory.labels[k].split("-")[1]) for k in best])
        correct = predicted == query_y.cpu()
        accuracies[e] = correct.float().mean().item()
        confidences.append(confidence.numpy())
        corrects.append(correct.numpy())
    mean = float(accuracies.mean())
    ci95 = 1.96 * float(accuracies.std(ddof=1)) / math.sqrt(episodes) if episodes > 1 else None
    ece = expected_calibration_error(np.concatenate(confidences), np.concatenate(corrects))
    return EvalResult(way, shot, episodes, queries_per_class, mean, ci95, seed, dtype_name, ece,
                      within_alphabet)


def _m_dtype_name(dtype: torch.dtype) -> str:
    for name, known in M_DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"M may be held in {', '.join(M_DTYPES)}, not {dtype}")


@dataclass(frozen=True)
class Skipped:
    way: int
    shot: int
    reason: str


@dataclass(frozen=True)
class GridResult:
    results: list[EvalResult]  # in (way, shot) order of the grid
    skipped: list[Skipped]  # points the model or the split cannot hold


def evaluate_grid(
    model: MetaNet,
    split: OmniglotSplit,
    *,
    ways: Sequence[int],
    shots: Sequence[int],
    episodes: int,
    seed: int = 0,
    queries_per_class: int = 5,
    m_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> GridResult:
    """`evaluate` at every (way, shot) of the grid, each from the same seed; points beyond the
    model's max_way / max_examples or the split's classes / drawings are skipped with the reason."""
    results, skipped = [], []
    for way in ways:
        for shot in shots:
            reason = _why_not(model, split, way, shot, queries_per_class)
            if reason is not None:
                skipped.append(Skipped(way, shot, reason))
                continue
            results.append(evaluate(model, split, way=way, shot=shot, episodes=episodes, seed=seed,
                                    queries_per_class=queries_per_class, m_dtype=m_dtype,
                                    progress=progress))
    return GridResult(results, skipped)


def _why_not(model: MetaNet, split: OmniglotSplit, way: int, shot: int, queries: int) -> str | None:
    n_chars, n_drawings = split.images.shape[:2]
    if way < 2 or shot < 1:
        return "an episode needs at least 2 classes and 1 shot"
    if way > model.max_way:  # the weights' trained max_way, which may be below the heads' size
        return f"the model takes at most max_way={model.max_way} classes"
    if way * shot > model.config.max_examples:
        return f"{way * shot} support examples exceed the model's max_examples={model.config.max_examples}"
    if way > n_chars:
        return f"the split has only {n_chars} classes"
    if shot + queries > n_drawings:
        return f"{shot} shots + {queries} queries exceed the split's {n_drawings} drawings per class"
    return None
