"""Calibrated confidence: temperatures for the query softmax, fitted on held-out alphabets.

A few-shot model's softmax is not a probability until it is calibrated: trained to put its answer
first, MetaNet says 0.999 on answers that are right nine times in ten. Temperature scaling (Guo et
al., ICML 2017) divides the logits by a number T fitted to minimise the negative log-likelihood of
held-out queries; the ranking, hence every answer, is unchanged.

How sharp the logits are depends on how many classes a task has: fitted alone, T runs from about 5
on 2-way tasks to 0.7 on 50-way ones (docs/model.md, "Calibration"), so one T for every task
leaves large tasks' answers less confident than they are right. T is therefore fitted per class
count, on a mix of the kinds of task users register (`FIT_TASKS`: 2 to 50 classes, one and five
shots, within one alphabet, uneven), and interpolated between the fitted counts
(`fit_temperatures`). The tasks are drawn from the validation alphabets (never trained on, never
evaluated on) and the table is saved with the weights (`MetaNet.temperature`, indexed by class
count), so every probability that leaves the model, on torch or onnxruntime, is calibrated.

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

    @property
    def examples(self) -> int:
        return self.shot * self.way + (self.heavy - self.shot if self.heavy else 0)


FIT_TASKS = (
    TaskKind("2-way 1-shot", 2),
    TaskKind("5-way 1-shot", 5),
    TaskKind("5-way 1-shot within one alphabet", 5, within_alphabet=True),
    TaskKind("5-way 5-shot", 5, shot=5),
    TaskKind("10-way 1-shot", 10),
    TaskKind("10-way 1-shot, one class of 3", 10, heavy=3),
    TaskKind("20-way 1-shot", 20),
    TaskKind("20-way 5-shot", 20, shot=5),
    TaskKind("30-way 1-shot", 30),
    TaskKind("50-way 1-shot", 50),
    TaskKind("50-way 2-shot", 50, shot=2),
)


PAD = -1e4  # the log-probability of classes a task does not have (a query's own are >= -70)


@dataclass(frozen=True)
class Answers:
    """Queries' log-probabilities at temperature 1, padded to max_way with PAD, their classes and
    their tasks' class counts."""

    log_probs: Tensor  # (n, max_way)
    labels: Tensor  # (n,)
    kinds: np.ndarray  # (n,) the TaskKind name of each query
    ways: Tensor  # (n,) the number of classes of each query's task

    def confidence_and_correct(self, temperature: float | Tensor = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """At one temperature, or at a table of them indexed by class count (`fit_temperatures`)."""
        if isinstance(temperature, Tensor):
            temperature = temperature[self.ways][:, None]
        probs = torch.softmax(self.log_probs / temperature, dim=1)
        confidence, predicted = probs.max(dim=1)
        return confidence.numpy(), (predicted == self.labels).numpy()

    def of_way(self, way: int) -> Answers:
        rows = self.ways == way
        return Answers(self.log_probs[rows], self.labels[rows], self.kinds[rows.numpy()], self.ways[rows])


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
    log_probs, labels, names, ways = [], [], [], []
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
                ways.append(torch.full((len(qx),), memory.n_way))
    finally:
        model.temperature.copy_(saved)
    return Answers(torch.cat(log_probs), torch.cat(labels), np.array(names), torch.cat(ways))


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


def fit_temperatures(answers: Answers, max_way: int) -> Tensor:
    """A temperature for every number of classes 0..max_way, shape (max_way + 1,): fitted at each
    class count the answers hold (all kinds of task of that count together), linear in the log of
    the class count between them and constant beyond the smallest and the largest."""
    ways = sorted(set(answers.ways.tolist()))
    fitted = [fit_temperature(answers.of_way(way)) for way in ways]
    log_counts = np.log(np.maximum(np.arange(max_way + 1), 1))  # 0 and 1 classes: no task has them
    table = np.interp(log_counts, np.log(ways), fitted)
    return torch.tensor(table, dtype=torch.float32)


def calibration_report(answers: Answers, temperature: float | Tensor) -> dict[str, dict[str, float]]:
    """Per kind of task (and "all"): accuracy, mean confidence and ECE at the given temperature
    (one, or a table indexed by class count)."""
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
