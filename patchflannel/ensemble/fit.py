"""Fitting the weight module on out-of-fold learner probabilities, and its calibration."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..losses import FocalLoss, class_alpha
from ..training.distributed import setup
from ..training.loop import fit
from ..training.schedules import LRPolicy
from .module import FlannelWeightModule

__all__ = ["WeightModuleConfig", "crossfit_temperature", "fit_weight_module"]


@dataclass
class WeightModuleConfig:
    """How `fit_weight_module` trains the weight module (saved beside its weights).

    Full-batch AdamW on the focal loss for a fixed number of steps: the stacking set is a few
    hundred out-of-fold predictions and the module has ~2,000 parameters, so there is no
    further hold-out to early-stop on; weight decay keeps the weights small instead.
    """

    gamma: float = 2.0
    hidden: int | None = None
    steps: int = 500
    lr: float = 1e-2
    weight_decay: float = 1e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fit_weight_module(probs, labels, config: WeightModuleConfig | None = None,
                      alpha: torch.Tensor | None = None) -> FlannelWeightModule:
    """Train a `FlannelWeightModule` on ``(N, L, C)`` learner probabilities and ``(N,)`` labels.

    ``probs`` must be out-of-fold: predictions of learners for images they were not trained
    on (stacking on in-sample predictions teaches the module to trust overfitted learners).
    ``alpha`` defaults to `class_alpha` of ``labels``. Deterministic for a given seed.
    """
    config = config or WeightModuleConfig()
    probs = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if probs.ndim != 3 or len(probs) != len(labels):
        raise ValueError(f"expected (N, L, C) probabilities and N labels; got {tuple(probs.shape)} and {len(labels)}")
    if torch.isnan(probs).any():
        raise ValueError("probabilities contain NaN (rejected images?); drop those rows first")
    num_classes = probs.shape[2]
    torch.manual_seed(config.seed)
    module = FlannelWeightModule(probs.shape[1], num_classes, hidden=config.hidden)
    alpha = class_alpha(labels, num_classes) if alpha is None else alpha
    place, _ = setup(torch.device("cpu"))
    n_total = len(labels)
    if place.active:
        # Each rank sums the loss over its share of the films, scaled so that the gradients
        # averaged over ranks are those of the mean over all films: the module one process fits.
        summed = FocalLoss(alpha, gamma=config.gamma, reduction="sum")
        loss_fn = lambda logits, y: summed(logits, y) * (place.world / n_total)  # noqa: E731
    else:
        loss_fn = FocalLoss(alpha, gamma=config.gamma)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # Full batch, a fixed number of steps (one "epoch" each), no validation: see WeightModuleConfig.
    fit(module, optimizer, LRPolicy(optimizer, "constant", epochs=config.steps, steps_per_epoch=1),
        epochs=config.steps, steps_per_epoch=1, images_per_step=n_total, seed=config.seed,
        draw_order=lambda _: torch.arange(n_total), make_batch=lambda idx, _: (probs[idx], labels[idx]),
        loss=loss_fn, place=place, device=torch.device("cpu"), progress=False)
    return module.eval()


def crossfit_temperature(probs, labels, groups, config: WeightModuleConfig | None = None,
                         n_splits: int = 5) -> tuple[float, np.ndarray]:
    """The temperature of the combined prediction, fitted without reusing the module's own fitting films.

    The fitting films are split into ``n_splits`` folds grouped by ``groups`` (patient ids);
    a module fitted on the other folds predicts each fold, and the temperature is fitted on
    these out-of-fold combined predictions (a temperature fitted on the films the module saw
    would make it look surer than it is). Returns ``(temperature, out_of_fold_probabilities)``.
    """
    from sklearn.model_selection import GroupKFold

    from ..evaluation.calibration import fit_temperature

    probs, labels = np.asarray(probs, dtype=np.float32), np.asarray(labels)
    oof = np.zeros((len(probs), probs.shape[2]), np.float32)
    for fitting, held in GroupKFold(n_splits=n_splits).split(probs, labels, np.asarray(groups)):
        oof[held] = fit_weight_module(probs[fitting], labels[fitting], config).predict_proba(probs[held]).numpy()
    return fit_temperature(oof, labels), oof
