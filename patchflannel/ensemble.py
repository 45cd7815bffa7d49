"""The FLANNEL neural weight module and multiclass focal loss.

Fitting the module for a learner set (on the set's validation patients, whose films no
learner trained on):

    python -m patchflannel.ensemble --learners weights/learners-lite --split weights/learners-lite/split.csv \
        --packs runs/masked/cxr4.h5 runs/masked/adult.h5 --out weights/ensemble-lite

The weight module combines L base learners' C-class probabilities: with ``f`` the
concatenation of the L probability vectors (L*C values), ``w = tanh(Linear(vec(f f^T)))``
gives one weight per learner and the prediction is ``softmax(sum_i w_i p_i)``. The outer
product lets a learner's weight depend on how all learners' beliefs co-occur.

Example:
    >>> module = FlannelWeightModule(num_learners=5, num_classes=4)
    >>> probs = torch.softmax(torch.randn(8, 5, 4), -1)     # (batch, learners, classes)
    >>> logits = module(probs)                               # softmax(logits) is the prediction
    >>> combined = module.predict_proba(probs)               # that softmax, without gradients
    >>> loss = FocalLoss(alpha=class_alpha(torch.tensor([0, 1, 2, 3, 3])), gamma=2.0)(logits, torch.zeros(8, dtype=torch.long))
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bundle import load_state, read_bundle, write_bundle
from .distributed import setup


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


def class_alpha(labels: torch.Tensor, num_classes: int = 4) -> torch.Tensor:
    """Focal-loss alpha proportional to 1 / class count in ``labels``, normalised to sum to C
    (a class absent from ``labels`` gets the weight of a class seen once)."""
    counts = torch.bincount(torch.as_tensor(labels).long(), minlength=num_classes).float().clamp(min=1)
    inverse = 1.0 / counts
    return inverse * num_classes / inverse.sum()


class FocalLoss(nn.Module):
    """Multiclass softmax focal loss: ``sum_c -alpha_c y_c (1 - p_c)^gamma log p_c`` per sample.

    With ``gamma=0`` and ``alpha=None`` (all ones) it is exactly cross-entropy. The default
    ``gamma=2`` is the value of Lin et al. (2017); FLANNEL used 10 with a summed loss, which
    shrinks the loss of any sample predicted with p > 0.5 by > 1000x and leaves a few hundred
    stacking samples almost no gradient, so it is available but not the default.

    Args:
        alpha: per-class weights ``(C,)`` (e.g. :func:`class_alpha` of the training fold) or None.
        gamma: focusing parameter >= 0.
        reduction: ``"mean"`` over samples, ``"sum"``, or ``"none"``.
    """

    def __init__(self, alpha: torch.Tensor | None = None, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        if gamma < 0:
            raise ValueError("gamma must be >= 0")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))
        self.gamma, self.reduction = gamma, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, C)``, ``target`` ``(B,)`` class indices."""
        log_p = F.log_softmax(logits.float(), -1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss.device)[target]
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


@dataclass
class WeightModuleConfig:
    """How :func:`fit_weight_module` trains the weight module (saved beside its weights).

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
    """Train a :class:`FlannelWeightModule` on ``(N, L, C)`` learner probabilities and ``(N,)`` labels.

    ``probs`` must be out-of-fold: predictions of learners for images they were not trained
    on (stacking on in-sample predictions teaches the module to trust overfitted learners).
    ``alpha`` defaults to :func:`class_alpha` of ``labels``. Deterministic for a given seed.
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
    # Under torchrun each rank takes a share of the films and the summed gradients are the
    # full batch's: the same module as one process fits.
    place, _ = setup(torch.device("cpu"))
    n_total = len(labels)
    probs, labels = place.share(probs), place.share(labels)
    loss_fn = FocalLoss(alpha, gamma=config.gamma, reduction="sum" if place.active else "mean")
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    module.train()
    for _ in range(config.steps):
        optimizer.zero_grad()
        loss = loss_fn(module(probs), labels)
        if place.active:
            loss = loss / n_total  # this rank's part of the mean over all films
        loss.backward()
        if place.active:
            for p in module.parameters():
                torch.distributed.all_reduce(p.grad)
        optimizer.step()
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

    from .calibration import fit_temperature

    probs, labels = np.asarray(probs, dtype=np.float32), np.asarray(labels)
    oof = np.zeros((len(probs), probs.shape[2]), np.float32)
    for fit, held in GroupKFold(n_splits=n_splits).split(probs, labels, np.asarray(groups)):
        oof[held] = fit_weight_module(probs[fit], labels[fit], config).predict_proba(probs[held]).numpy()
    return fit_temperature(oof, labels), oof


def save_weight_module(folder: str | os.PathLike, module: FlannelWeightModule, *, learners: list[str],
                       classes: list[str], config: WeightModuleConfig | None = None, temperature: float = 1.0,
                       extra: dict | None = None) -> None:
    """Write the module as a bundle; ``learners`` records the order of axis 1 its inputs need and
    ``temperature`` the calibration of its combined prediction (see :func:`crossfit_temperature`)."""
    if len(learners) != module.num_learners:
        raise ValueError(f"{len(learners)} learner names for a module of {module.num_learners} learners")
    hidden = module.weights[0].out_features if isinstance(module.weights, nn.Sequential) else None
    write_bundle(folder, module, {"task": "flannel-weight-module", "learners": list(learners),
                                  "classes": list(classes), "hidden": hidden, "temperature": float(temperature),
                                  "training": (config or WeightModuleConfig()).to_dict(), **(extra or {})})


def load_weight_module(folder: str | os.PathLike, *, verify: bool = True) -> tuple[FlannelWeightModule, dict]:
    """The module of a bundle written by :func:`save_weight_module`, and its config.

    ``folder`` may name a shipped bundle from any working directory (``weights/ensemble-lite``
    or ``ensemble-lite``, see :func:`patchflannel.bundle.resolve_bundle`). Its config
    (learner order, temperature...) and weights are verified against their recorded hashes;
    ``verify=False`` (or ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1``) loads an unverified bundle,
    with a warning.

    Raises:
        WeightsError: see :func:`patchflannel.bundle.read_bundle`; also keys of the wrong type
            or a non-positive temperature, naming the config file.
    """
    from .bundle import CONFIG_FILE, resolve_bundle
    from .errors import WeightsError

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


def main(argv=None) -> None:
    import argparse
    import json
    import logging
    from pathlib import Path

    from .calibration import apply_temperature, expected_calibration_error
    from .cv import read_split
    from .learners.bundle import load_learner_set
    from .learners.data import read_rows
    from .learners.engine import PatchEngine
    from .learners.evaluate import predict_probs
    from .learners.registry import CLASSES, Normalization
    from .metrics import classification_report

    p = argparse.ArgumentParser(prog="python -m patchflannel.ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learners", type=Path, required=True, help="folder of learner bundles")
    p.add_argument("--packs", nargs="+", required=True, help="Stage 1 HDF5 packs")
    p.add_argument("--split", type=Path, required=True, help="patient_id,split CSV the learners were trained with")
    p.add_argument("--fit-on", default="val", help="split whose films the module is fitted on (never 'train')")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--k", type=int, default=16, help="patches per film")
    p.add_argument("--gamma", type=float, default=WeightModuleConfig.gamma)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--steps", type=int, default=WeightModuleConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.fit_on == "train":
        p.error("the module must be fitted on films the learners did not train on")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    learners, shared = load_learner_set(args.learners)
    engine = PatchEngine(learners, k=args.k, patch_size=shared["patch_size"],
                         normalization=Normalization(**shared["normalization"]), device=args.device, seed=args.seed)
    split = read_split(args.split)
    rows = [r for r in read_rows(args.packs) if split.get(r["patient_id"]) == args.fit_on and r["label"] in CLASSES]
    probs = predict_probs(engine, rows)
    labels = np.asarray([CLASSES.index(r["label"]) for r in rows])
    config = WeightModuleConfig(gamma=args.gamma, hidden=args.hidden, steps=args.steps, seed=args.seed)
    module = fit_weight_module(probs, labels, config)
    fitted = classification_report(labels, module.predict_proba(probs).argmax(-1).numpy())
    temperature, oof = crossfit_temperature(probs, labels, [r["patient_id"] for r in rows], config)
    calibration = {"temperature": temperature, "ece_out_of_fold": expected_calibration_error(oof, labels),
                   "ece_out_of_fold_calibrated": expected_calibration_error(apply_temperature(oof, temperature), labels)}
    save_weight_module(args.out, module, learners=list(learners), classes=list(CLASSES), config=config,
                       temperature=temperature,
                       extra={"fitted_on": {"split_file": args.split.name, "split": args.fit_on, "films": len(rows),
                                            "k": args.k, "packs": [Path(x).name for x in args.packs],
                                            "macro_f1_on_fitting_films": fitted["macro_f1"]},
                              "calibration": calibration})
    print(json.dumps({"films": len(rows), "macro_f1_on_fitting_films": fitted["macro_f1"], **calibration,
                      "out": str(args.out)}))


if __name__ == "__main__":
    main()
