"""Calibrated confidence and the uncertainty reported with every prediction.

Temperature scaling (Guo et al., 2017) divides the log-probabilities of the combined
prediction by one scalar ``T`` fitted on validation films; it changes how sure the
prediction is, never which class wins. The expected calibration error (ECE) says how far
the confidence is from the accuracy, before and after.

Examples:
    >>> import torch
    >>> from patchflannel.evaluation.calibration import apply_temperature, expected_calibration_error, fit_temperature
    >>> probs = torch.softmax(torch.randn(200, 4) * 3, -1); labels = torch.randint(0, 4, (200,))
    >>> t = fit_temperature(probs, labels)             # > 1: these random "predictions" are overconfident
    >>> expected_calibration_error(apply_temperature(probs, t), labels) < expected_calibration_error(probs, labels)
    True
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["apply_temperature", "expected_calibration_error", "fit_temperature", "normalised_entropy",
           "uncertainty"]

_EPS = 1e-7


def _log(probs) -> torch.Tensor:
    return torch.as_tensor(np.asarray(probs), dtype=torch.float64).clamp_min(_EPS).log()


def apply_temperature(probs, temperature: float) -> torch.Tensor:
    """``softmax(log(probs) / T)`` over the last axis (float32)."""
    return torch.softmax(_log(probs) / temperature, -1).float()


def fit_temperature(probs, labels, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` under
    `apply_temperature` (a one-dimensional search over ``log T``, deterministic)."""
    log_p, y = _log(probs), torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(log_p / math.exp(log_t), y))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    for _ in range(80):  # golden-section search: the NLL is unimodal in log T
        a, b = hi - (hi - lo) / 1.618034, lo + (hi - lo) / 1.618034
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return round(math.exp((lo + hi) / 2), 4)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE of the top-class confidence: the bin-size-weighted mean |accuracy - confidence|
    over ``n_bins`` equal-width confidence bins."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    confidence, predicted = p.max(1), p.argmax(1)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs((predicted[inside] == y[inside]).mean() - confidence[inside].mean())
    return round(float(ece), 4)


def normalised_entropy(p) -> float:
    """Entropy of a distribution divided by its maximum (0 = certain, 1 = uniform)."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0)
    return float(-(p * np.log(p)).sum() / math.log(len(p)))


def uncertainty(probabilities, learner_probabilities, learner_votes) -> dict[str, float]:
    """The uncertainty measures of one prediction.

    Args:
        probabilities: the combined class probabilities ``(C,)``.
        learner_probabilities: each learner's mean patch probabilities ``(L, C)``.
        learner_votes: each learner's patch vote fractions ``(L, C)``.

    Returns:
        ``entropy`` (normalised, of the combined probabilities), ``vote_entropy`` (normalised,
        of all learners' patch votes pooled), ``learner_disagreement`` (fraction of learners
        whose own label differs from the combined label) and ``margin`` (top probability
        minus the runner-up).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    learner_labels = np.asarray(learner_probabilities).argmax(1)
    top2 = np.sort(p)[-2:]
    return {"entropy": round(normalised_entropy(p), 4),
            "vote_entropy": round(normalised_entropy(np.asarray(learner_votes).mean(0)), 4),
            "learner_disagreement": round(float(np.mean(learner_labels != p.argmax())), 4),
            "margin": round(float(top2[1] - top2[0]), 4)}
