"""White-box tests of model/evaluate.py: N-way K-shot accuracy with a 95% confidence interval, run
through the public register/classify API with string labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from model import ClassifyOutput
from model.data import OmniglotSplit
from model.evaluate import M_DTYPES, evaluate, evaluate_grid


def test_evaluate_reports_way_shot_episodes_accuracy_and_ci95(model, tiny_split):
    result = evaluate(model, tiny_split, way=4, shot=1, episodes=3, seed=5)
    assert (result.way, result.shot, result.episodes, result.queries_per_class, result.seed) == (
        4,
        1,
        3,
        5,
        5,
    )
    assert 0.0 <= result.accuracy <= 1.0
    assert math.isfinite(result.ci95) and result.ci95 >= 0.0
    assert set(result.to_dict()) == {
        "way",
        "shot",
        "episodes",
        "queries_per_class",
        "accuracy",
        "ci95",
        "seed",
        "m_dtype",
        "ece",
        "within_alphabet",
    }
    assert result.m_dtype == "float32"


def test_evaluate_is_reproducible_from_its_seed(model, tiny_split):
    first = evaluate(model, tiny_split, way=3, shot=2, episodes=2, seed=1, queries_per_class=2)
    second = evaluate(model, tiny_split, way=3, shot=2, episodes=2, seed=1, queries_per_class=2)
    assert first == second


def test_evaluate_refuses_zero_episodes(model, tiny_split):
    with pytest.raises(ValueError, match="at least 1"):
        evaluate(model, tiny_split, way=2, shot=1, episodes=0)


def spy_on_m_dtypes(model, monkeypatch) -> list[torch.dtype]:
    """The dtype of M in every memory `model.classify` is given, in call order."""
    seen, classify = [], model.classify

    def recording(memory, images, **kwargs):
        seen.append(memory.M.dtype)
        return classify(memory, images, **kwargs)

    monkeypatch.setattr(model, "classify", recording)
    return seen


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_evaluate_holds_m_in_the_given_dtype_between_register_and_classify(model, tiny_split, monkeypatch,
                                                                           name):
    seen = spy_on_m_dtypes(model, monkeypatch)
    result = evaluate(model, tiny_split, way=3, shot=1, episodes=2, seed=1, queries_per_class=2,
                      m_dtype=M_DTYPES[name])
    assert seen == [M_DTYPES[name]] * 2
    assert result.m_dtype == name and result.to_dict()["m_dtype"] == name
    assert 0.0 <= result.accuracy <= 1.0


def test_evaluate_in_float32_classifies_the_memory_as_registered(model, tiny_split, monkeypatch):
    seen = spy_on_m_dtypes(model, monkeypatch)
    result = evaluate(model, tiny_split, way=3, shot=1, episodes=2, seed=1, queries_per_class=2)
    assert result.m_dtype == "float32"
    assert seen == [torch.float32] * 2


def test_evaluate_in_half_precision_scores_the_same_episodes_as_float32(model, tiny_split):
    # Same seed, same episodes: only the rounding of M differs, which a tiny model barely feels.
    full = evaluate(model, tiny_split, way=4, shot=1, episodes=3, seed=2, queries_per_class=2)
    half = evaluate(model, tiny_split, way=4, shot=1, episodes=3, seed=2, queries_per_class=2,
                    m_dtype=torch.float16)
    assert half.accuracy == pytest.approx(full.accuracy, abs=0.1)


def test_evaluate_refuses_an_m_dtype_the_service_cannot_hold(model, tiny_split):
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        evaluate(model, tiny_split, way=2, shot=1, episodes=1, m_dtype=torch.float64)


class LookupModel(nn.Module):
    """A stand-in with the register/classify API that recognises a character by its pixel value.

    With `always_first` it predicts the first registered label for every query.
    """

    def __init__(self, always_first: bool = False) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # evaluate finds the device from the parameters
        self.always_first = always_first

    def register(self, images, labels):
        names = list(dict.fromkeys(labels))
        by_value = {float(x.max()): names.index(lab) for x, lab in zip(images, labels, strict=True)}
        return type("Memory", (), {"labels": tuple(names), "by_value": by_value})()

    def classify(self, memory, images):
        ids = [0 if self.always_first else memory.by_value[float(x.max())] for x in images]
        return ClassifyOutput(torch.eye(len(memory.labels))[ids], None, torch.ones(len(ids)))


@pytest.fixture
def flat_split() -> OmniglotSplit:
    """6 characters whose 6 drawings are all the same flat image of value (c + 1) / 10."""
    images = np.repeat(((np.arange(6) + 1) / 10).astype(np.float32)[:, None, None, None], 6, axis=1)
    images = np.broadcast_to(images, (6, 6, 28, 28)).copy()
    return OmniglotSplit(images, np.array(["A"] * 6), np.array([f"c{i}" for i in range(6)]))


def test_evaluate_scores_a_perfect_classifier_at_one_with_no_spread(flat_split):
    result = evaluate(LookupModel(), flat_split, way=5, shot=1, episodes=4)
    assert result.accuracy == 1.0 and result.ci95 == 0.0


def test_evaluate_scores_a_constant_guess_at_one_over_way(flat_split):
    result = evaluate(
        LookupModel(always_first=True), flat_split, way=4, shot=2, episodes=3, queries_per_class=3
    )
    assert result.accuracy == pytest.approx(1 / 4) and result.ci95 == pytest.approx(0.0)


def test_evaluate_grid_runs_every_point_that_fits_and_says_why_others_do_not(model, tiny_split):
    # TINY: max_way=6, max_examples=12; the split: 8 characters x 6 drawings.
    grid = evaluate_grid(model, tiny_split, ways=(2, 4, 7), shots=(1, 3), episodes=2, seed=3,
                         queries_per_class=2)
    assert [(r.way, r.shot) for r in grid.results] == [(2, 1), (2, 3), (4, 1), (4, 3)]
    assert all(r.episodes == 2 and r.seed == 3 and 0 <= r.accuracy <= 1 for r in grid.results)
    assert [(s.way, s.shot) for s in grid.skipped] == [(7, 1), (7, 3)]
    assert all("max_way=6" in s.reason for s in grid.skipped)


def test_evaluate_grid_holds_m_in_the_given_dtype_at_every_point(model, tiny_split, monkeypatch):
    seen = spy_on_m_dtypes(model, monkeypatch)
    grid = evaluate_grid(model, tiny_split, ways=(2, 3), shots=(1,), episodes=1, queries_per_class=2,
                         m_dtype=torch.bfloat16)
    assert [r.m_dtype for r in grid.results] == ["bfloat16", "bfloat16"]
    assert seen == [torch.bfloat16] * 2


def test_evaluate_grid_point_equals_evaluate_at_that_point(model, tiny_split):
    grid = evaluate_grid(model, tiny_split, ways=(3,), shots=(2,), episodes=2, seed=1, queries_per_class=2)
    alone = evaluate(model, tiny_split, way=3, shot=2, episodes=2, seed=1, queries_per_class=2)
    assert grid.results == [alone]


@pytest.mark.parametrize(("way", "shot", "queries", "reason"), [
    (6, 3, 2, "18 support examples exceed the model's max_examples=12"),
    (2, 5, 2, "5 shots + 2 queries exceed the split's 6 drawings per class"),
])
def test_evaluate_grid_skips_what_the_model_or_the_split_cannot_hold(model, tiny_split, way, shot, queries,
                                                                     reason):
    grid = evaluate_grid(model, tiny_split, ways=(way,), shots=(shot,), episodes=1, queries_per_class=queries)
    assert grid.results == [] and grid.skipped[0].reason == reason


def test_a_sure_perfect_classifier_is_perfectly_calibrated_and_a_sure_guess_is_not(flat_split):
    assert evaluate(LookupModel(), flat_split, way=5, shot=1, episodes=3).ece == pytest.approx(0.0)
    # Sure of the first label every time, right one time in five: ECE = 1 - 1/5.
    guess = evaluate(LookupModel(always_first=True), flat_split, way=5, shot=1, episodes=3)
    assert guess.ece == pytest.approx(0.8)


def test_within_alphabet_tasks_draw_every_class_from_one_alphabet(model, tiny_split):
    """tiny_split has two alphabets of 4 characters: a 4-way task within one takes all of one."""
    result = evaluate(model, tiny_split, way=4, shot=1, episodes=2, within_alphabet=True)
    assert result.within_alphabet and 0.0 <= result.accuracy <= 1.0
    with pytest.raises(ValueError):
        evaluate(model, tiny_split, way=5, shot=1, episodes=1, within_alphabet=True)  # no alphabet has 5
