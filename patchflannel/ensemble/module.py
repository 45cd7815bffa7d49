"""The FLANNEL neural weight module: its network, and its bundle format.

Fitting it: `patchflannel.ensemble.fit`, and ``python -m patchflannel.ensemble`` for a learner set.

The weight module combines L base learners' C-class probabilities: with ``f`` the
concatenation of the L probability vectors (L*C values), ``w = tanh(Linear(vec(f f^T)))``
gives one weight per learner and the prediction is ``softmax(sum_i w_i p_i)``. The outer
product lets a learner's weight depend on how all learners' beliefs co-occur.

Examples:
    >>> module = FlannelWeightModule(num_learners=5, num_classes=4)
    >>> probs = torch.softmax(torch.randn(8, 5, 4), -1)     # (batch, learners, classes)
    >>> logits = module(probs)                               # softmax(logits) is the prediction
    >>> combined = module.predict_proba(probs)               # that softmax, without gradients
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..bundle import CONFIG_FILE, load_state, read_bundle, write_bundle
from ..errors import WeightsError
from ..hub import resolve_bundle

__all__ = ["FlannelWeightModule", "load_weight_module", "save_weight_module"]


class FlannelWeightModule(nn.Module):
    """``(B, L, C)`` learner probabilities -> ``(B, C)`` logits of the combined prediction.

    Args:
        num_learners: L.
        num_classes: C.
        hidden: ``None`` for the published module (one linear layer on ``vec(f f^T)``); an int
            adds a hidden ReLU layer of that width (a documented variant, not the paper's).
    """

    def __init__(self, num_learners: int = 5, num_classes: int = 4, hidden: int | None = None):
        super().__init__()
        self.num_learners, self.num_classes = num_learners, num_classes
        d = (num_learners * num_classes) ** 2
        if hidden is None:
            self.weights = nn.Linear(d, num_learners)
        else:
            self.weights = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_learners))

    def learner_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` weights in [-1, 1] for ``(B, L, C)`` probabilities."""
        if probs.shape[1:] != (self.num_learners, self.num_classes):
            raise ValueError(f"expected (B, {self.num_learners}, {self.num_classes}) probabilities, "
                             f"got {tuple(probs.shape)}")
        f = probs.flatten(1)
        outer = torch.einsum("bi,bj->bij", f, f).flatten(1)  # vec(f f^T)
        return torch.tanh(self.weights(outer))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Logits ``sum_i w_i p_i``; the prediction is their softmax."""
        return torch.einsum("bl,blc->bc", self.learner_weights(probs), probs)

    @torch.no_grad()
    def predict_proba(self, probs) -> torch.Tensor:
        """The combined prediction ``softmax(sum_i w_i p_i)``, ``(B, C)``, for ``(B, L, C)``
        learner probabilities (tensor or array)."""
        return self(torch.as_tensor(np.asarray(probs, dtype=np.float32))).softmax(-1)


def save_weight_module(folder: str | os.PathLike, module: FlannelWeightModule, *, learners: list[str],
                       classes: list[str], fit_k: int | None = None, config=None, temperature: float = 1.0,
                       extra: dict | None = None) -> None:
    """Write the module as a bundle; ``learners`` records the order of axis 1 its inputs need,
    ``fit_k`` the patches per film of the probabilities it was fitted on (a pipeline at another K
    feeds it averages of another sharpness, and says so) and ``temperature`` the calibration of
    its combined prediction (see `patchflannel.ensemble.fit.crossfit_temperature`)."""
    if len(learners) != module.num_learners:
        raise ValueError(f"{len(learners)} learner names for a module of {module.num_learners} learners")
    hidden = module.weights[0].out_features if isinstance(module.weights, nn.Sequential) else None
    write_bundle(folder, module, {"task": "flannel-weight-module", "learners": list(learners),
                                  "classes": list(classes), "hidden": hidden, "fit_k": fit_k, "temperature": float(temperature),
                                  "training": None if config is None else config.to_dict(), **(extra or {})})


def load_weight_module(folder: str | os.PathLike, *, verify: bool = True) -> tuple[FlannelWeightModule, dict]:
    """The module of a bundle written by `save_weight_module`, and its config.

    ``folder`` may name a shipped bundle from any working directory (``weights/ensemble-lite``
    or ``ensemble-lite``, see `patchflannel.hub.resolve_bundle`). Its config
    (learner order, temperature...) and weights are verified against their recorded hashes;
    ``verify=False`` (or ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1``) loads an unverified bundle,
    with a warning.

    Raises:
        WeightsError: see `patchflannel.bundle.read_bundle`; also keys of the wrong type
            or a non-positive temperature, naming the config file.
    """
    folder = resolve_bundle(folder, "weight module bundle")
    state, config = read_bundle(folder, "weight module", verify=verify, required=("learners", "classes"))
    config_path = folder / CONFIG_FILE
    for key in ("learners", "classes"):
        value = config[key]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise WeightsError(f"{config_path}: {key!r} must be a non-empty list of names, not {value!r}")
    hidden, temperature = config.get("hidden"), config.get("temperature", 1.0)
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise WeightsError(f"{config_path}: 'hidden' must be null or a positive integer, not {hidden!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise WeightsError(f"{config_path}: 'temperature' must be a positive number, not {temperature!r}")
    module = FlannelWeightModule(len(config["learners"]), len(config["classes"]), hidden=hidden)
    return load_state(module, state, folder).eval(), config


