"""Calibrated confidence: a temperature for the query softmax, fitted on held-out alphabets.

A few-shot model's softmax is not a probability until it is calibrated: trained to put its answer
first, MetaNet says 0.999 on answers that are right nine times in ten. Temperature scaling (Guo et
al., ICML 2017) divides the logits by one number T > 1 fitted to minimise the negative
log-likelihood of held-out queries; the ranking, hence every answer, is unchanged. The tasks it is
fitted on are a mix of the kinds users register (`FIT_TASKS`), drawn from the validation alphabets
(never trained on, never evaluated on), and T is saved with the weights (`MetaNet.temperature`), so
every probability that leaves the model, on torch or onnxruntime, is calibrated.

The expected calibration error (ECE) is the gap between confidence and accuracy, averaged over 10
equal-width confidence bins weighted by their share of the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.data import EpisodeSampler, OmniglotSplit
from model.metanet import MetaNet


@dataclass(frozen=True)
class TaskKind:
    """A kind of task: n_way classes, `shot` support examples each (the first class `heavy` of them
    instead, when heavy > 0: an uneven set), drawn from the whole split or within one alphabet."""

    name: str
    way: int
    shot: int = 1
    within_alphabet: bool = False
    heavy: int = 0


FIT_TASKS = (
    TaskKind("5-way 1-shot", 5),
    TaskKind("20-way 1-shot", 20),
    TaskKind("5-way 1-shot within one alphabet", 5, within_alphabet=True),
    TaskKind("20-way 5-shot", 20, shot=5),
    TaskKind("10-way 1-shot, one class of 3", 10, heavy=3),
)


PAD = -1e4  # the log-probability of classes a task does not have (a query's own are >= -70)


@dataclass(frozen=True)
class Answers:
    """Queries' log-probabilities at temperature 1, padded to max_way with PAD, and their classes."""

    log_probs: Tensor  # (n, max_way)
    labels: Tensor  # (n,)
    kinds: np.ndarray  # (n,) the TaskKind name of each query

    def confidence_and_correct(self, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        probs = torch.softmax(self.log_probs / temperature, dim=1)
        confidence, predicted = probs.max(dim=1)
        return confidence.numpy(), (predicted == self.labels).numpy()


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE over `bins` equal-width confidence bins: sum over bins of |accuracy - mean confidence|
    weighted by the bin's share of the answers."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        raise ValueError("no answers to measure")
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # confidence 1.0 in the top bin
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def sample_task(
    split: OmniglotSplit, kind: TaskKind, rng: np.random.Generator, queries: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(support_x, support_y, query_x, query_y) of one task of `kind`, no rotations."""
    if kind.within_alphabet:
        counts = {a: int((split.alphabet == a).sum()) for a in split.alphabets}
        alphabet = rng.choice(sorted(a for a, n in counts.items() if n >= kind.way))
        split = split.select_alphabets({str(alphabet)})
    shots = [kind.heavy or kind.shot] + [kind.shot] * (kind.way - 1)
    ep = EpisodeSampler(split, rotate=False, device=device).sample(rng, kind.way, shots, queries)
    return ep.support_x, ep.support_y, ep.query_x, ep.query_y


def collect_answers(
    model: MetaNet, split: OmniglotSplit, kinds: Sequence[TaskKind], *, episodes: int, seed: int = 0,
    queries: int = 5,
) -> Answers:
    """Run `episodes` tasks of each kind through register and classify at temperature 1."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    saved = model.temperature.clone()
    model.temperature.fill_(1.0)
    log_probs, labels, names = [], [], []
    try:
        for kind in kinds:
            for _ in range(episodes):
                sx, sy, qx, qy = sample_task(split, kind, rng, queries, device)
                memory = model.register(sx, [f"c{int(k)}" for k in sy])
                probs = model.classify(memory, qx).probs.cpu()
                padded = torch.full((len(qx), model.config.max_way), PAD)
                padded[:, : memory.n_way] = probs.clamp_min(1e-30).log()
                log_probs.append(padded)
                labels.append(qy.cpu())  # register numbers classes by first appearance: c0, c1, ...
                names += [kind.name] * len(qx)
    finally:
        model.temperature.copy_(saved)
    return Answers(torch.cat(log_probs), torch.cat(labels), np.array(names))


def fit_temperature(answers: Answers) -> float:
    """The T minimising the mean negative log-likelihood of softmax(log_probs / T), T in [0.1, 100].

    The likelihood is convex in 1 / T (a log-sum-exp of linear functions of it, less a linear
    one), so a ternary search on 1 / T finds its minimum."""
    logits = answers.log_probs.clamp_min(PAD)  # finite: -inf * 0 would make the loss NaN

    def nll(inverse: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits * inverse, answers.labels))

    low, high = 0.01, 10.0
    for _ in range(100):
        a, b = low + (high - low) / 3, high - (high - low) / 3
        if nll(a) <= nll(b):
            high = b
        else:
            low = a
    return 1.0 / ((low + high) / 2)


def calibration_report(answers: Answers, temperature: float) -> dict[str, dict[str, float]]:
    """Per kind of task (and "all"): accuracy, mean confidence and ECE at the given temperature."""
    confidence, correct = answers.confidence_and_correct(temperature)
    report = {}
    for name in [*dict.fromkeys(answers.kinds.tolist()), "all"]:
        rows = np.ones(len(correct), bool) if name == "all" else answers.kinds == name
        report[name] = {
            "queries": int(rows.sum()),
            "accuracy": float(correct[rows].mean()),
            "confidence": float(confidence[rows].mean()),
            "ece": expected_calibration_error(confidence[rows], correct[rows]),
        }
    return report
