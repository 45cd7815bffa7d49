"""Temperature scaling, calibration error and the per-prediction uncertainty measures."""
import numpy as np
import pytest
import torch

from patchflannel.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    normalised_entropy,
    uncertainty,
)
from patchflannel.ensemble.fit import crossfit_temperature


def _overconfident(n=4000, true_t=2.5, seed=0):
    """Labels drawn from softmax(z); predictions softmax(true_t * z): T = true_t undoes it."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=g)[:, 0]
    return torch.softmax(true_t * z, -1), labels


def test_fit_temperature_recovers_the_true_temperature_and_lowers_ece():
    probs, labels = _overconfident()
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    calibrated = apply_temperature(probs, t)
    assert expected_calibration_error(calibrated, labels) < expected_calibration_error(probs, labels) / 2
    assert torch.equal(calibrated.argmax(1), probs.argmax(1))  # calibration never changes the class
    assert fit_temperature(probs, labels) == t  # deterministic


def test_expected_calibration_error_reference_values():
    labels = np.array([0, 0, 1, 1])
    perfect = np.eye(4)[labels]
    assert expected_calibration_error(perfect, labels) == 0
    # confidence 0.7 everywhere, half right: |0.5 - 0.7| = 0.2
    p = np.array([[0.7, 0.1, 0.1, 0.1]] * 4)
    assert expected_calibration_error(p, labels) == pytest.approx(0.2)


def test_uncertainty_measures():
    agree = np.array([[0.9, 0.05, 0.03, 0.02]] * 5)
    votes = np.array([[1.0, 0, 0, 0]] * 5)
    u = uncertainty(agree[0], agree, votes)
    assert u["learner_disagreement"] == 0 and u["vote_entropy"] == pytest.approx(0, abs=1e-5)
    assert u["margin"] == pytest.approx(0.85)
    split = np.array([[0.9, 0.1, 0, 0]] * 2 + [[0.1, 0.9, 0, 0]] * 3)
    assert uncertainty([0.6, 0.4, 0, 0], split, split)["learner_disagreement"] == pytest.approx(0.6)
    assert normalised_entropy([0.25] * 4) == pytest.approx(1)


def test_crossfit_temperature_uses_out_of_fold_predictions():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    logits = torch.randn(200, 5, 4, generator=g) * 2 + torch.nn.functional.one_hot(labels, 4)[:, None]
    groups = np.arange(200) // 2  # two films per patient
    t, oof = crossfit_temperature(torch.softmax(logits, -1), labels, groups)
    assert oof.shape == (200, 4) and np.allclose(oof.sum(1), 1, atol=1e-5)
    assert expected_calibration_error(apply_temperature(oof, t), labels) < expected_calibration_error(oof, labels)
