"""Calibration (model/calibrate.py): the expected calibration error and the fitted temperature."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.calibrate import (
    FIT_TASKS,
    PAD,
    Answers,
    TaskKind,
    calibration_report,
    collect_answers,
    expected_calibration_error,
    fit_temperature,
    fit_temperatures,
)


def test_ece_weighs_each_bins_gap_by_its_share_of_the_answers():
    # Bin [0.9, 1.0): 4 answers at 0.95, 3 right (gap 0.2); bin [0.5, 0.6): 4 at 0.55, 2 right (0.05).
    confidence = np.array([0.95] * 4 + [0.55] * 4)
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 0])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.5 * 0.2 + 0.5 * 0.05)
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0  # 1.0: the top bin
    with pytest.raises(ValueError, match="no answers"):
        expected_calibration_error(np.array([]), np.array([]))


def synthetic_answers(true_temperature: float, n: int = 20000, way: int = 5) -> Answers:
    """Logits whose labels are drawn from softmax(logits / true_temperature): calibrated at it."""
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(n, way, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=1), 1, generator=gen)[:, 0]
    padded = torch.full((n, 50), PAD)
    padded[:, :way] = torch.log_softmax(logits, dim=1)
    return Answers(padded, labels, np.array([f"{way}-way"] * n), torch.full((n,), way))


def joined(*parts: Answers) -> Answers:
    return Answers(torch.cat([a.log_probs for a in parts]), torch.cat([a.labels for a in parts]),
                   np.concatenate([a.kinds for a in parts]), torch.cat([a.ways for a in parts]))


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at(true_temperature):
    answers = synthetic_answers(true_temperature)
    assert fit_temperature(answers) == pytest.approx(true_temperature, rel=0.05)
    wrong = 3.0 if true_temperature == 1 else 1.0
    assert calibration_report(answers, fit_temperature(answers))["all"]["ece"] < 0.02
    assert calibration_report(answers, wrong)["all"]["ece"] > 0.02


def test_a_temperature_is_fitted_per_number_of_classes_and_interpolated_in_its_log_between_them():
    answers = joined(synthetic_answers(4.0, way=2), synthetic_answers(1.0, way=8),
                     synthetic_answers(0.5, way=32))
    table = fit_temperatures(answers, max_way=50)
    assert table.shape == (51,)
    for way, true_temperature in ((2, 4.0), (8, 1.0), (32, 0.5)):
        assert float(table[way]) == pytest.approx(true_temperature, rel=0.05)
    # 4 classes: halfway between 2 and 8 in log(count), so halfway between their temperatures.
    assert float(table[4]) == pytest.approx((float(table[2]) + float(table[8])) / 2, rel=1e-5)
    assert float(table[0]) == float(table[1]) == float(table[2])  # held beyond the fitted counts
    assert float(table[50]) == float(table[32])
    # One temperature for all three leaves some class counts miscalibrated; the table does not.
    one = fit_temperature(answers)
    per_count = calibration_report(answers, table)
    assert max(per_count[f"{w}-way"]["ece"] for w in (2, 8, 32)) < 0.02
    assert max(calibration_report(answers, one)[f"{w}-way"]["ece"] for w in (2, 8, 32)) > 0.04


def test_answers_are_collected_at_temperature_one_and_leave_the_models_temperature_alone(model, tiny_split):
    model.temperature.fill_(3.0)
    kinds = [TaskKind("3-way", 3), TaskKind("3-way within", 3, within_alphabet=True),
             TaskKind("uneven", 3, heavy=2)]
    answers = collect_answers(model, tiny_split, kinds, episodes=2, queries=2)
    assert (model.temperature == 3.0).all()
    assert (answers.ways == 3).all()
    assert answers.log_probs.shape == (3 * 2 * 3 * 2, model.config.max_way)
    assert (answers.log_probs[:, 3:] == PAD).all()
    torch.testing.assert_close(answers.log_probs[:, :3].exp().sum(1), torch.ones(36))
    assert sorted(set(answers.kinds.tolist())) == ["3-way", "3-way within", "uneven"]
    assert {k.name for k in FIT_TASKS} >= {"20-way 1-shot", "5-way 1-shot within one alphabet"}
    assert {k.way for k in FIT_TASKS} >= {2, 50}  # every class count a task may have lies between
