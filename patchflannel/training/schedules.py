"""Optimizers, discriminative learning rates and the learning-rate schedules of every trainer."""
from __future__ import annotations

import itertools

import numpy as np
import torch

__all__ = ["OPTIMIZERS", "SCHEDULES", "LRPolicy", "layer_groups", "make_optimizer"]


def layer_groups(params: list[torch.nn.Parameter], lr: float, layer_decay: float = 1.0,
                 n_groups: int = 4) -> list[dict]:
    """Optimizer parameter groups for discriminative fine-tuning: ``params`` (in model order,
    input side first) cut into ``n_groups`` contiguous groups, the last (the head side) at
    ``lr`` and each earlier one ``layer_decay`` times the next. ``layer_decay=1`` is one group."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], not {layer_decay}")
    if layer_decay == 1 or len(params) < 2:
        return [{"params": params, "lr": lr}]
    n_groups = min(n_groups, len(params))
    cuts = np.linspace(0, len(params), n_groups + 1).round().astype(int)
    return [{"params": params[a:b], "lr": lr * layer_decay ** (n_groups - 1 - g)}
            for g, (a, b) in enumerate(itertools.pairwise(cuts))]


OPTIMIZERS = ("adamw", "adam", "sgd")


def make_optimizer(groups: list[dict], name: str, *, weight_decay: float, momentum: float = 0.9):
    """AdamW, Adam (L2 penalty ``weight_decay``; ``momentum`` is beta1) or SGD (Nesterov ``momentum``)."""
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, betas=(momentum, 0.999), weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {name!r}")


SCHEDULES = ("onecycle", "cyclic", "step", "plateau", "constant")


class LRPolicy:
    """The learning-rate (and momentum) schedule of a run, one object for every policy.

    ``onecycle`` (``OneCycleLR``, warm-up ``pct_start``, momentum cycled) and ``cyclic``
    (``CyclicLR`` triangular between a tenth of each group's rate and the rate, a cycle every
    ``cycle_epochs`` epochs, momentum cycled inversely) step after every batch; ``step``
    (``StepLR``: x ``gamma`` every ``step_size`` epochs) and ``plateau`` (``ReduceLROnPlateau``
    on the validation score: x ``gamma`` after ``plateau_patience`` epochs without
    improvement) after every epoch; ``constant`` never changes the rate. Per-group rates
    (`layer_groups`) are kept: each group gets its own cycle.

    Call `step` after each optimizer step and `epoch_end` with the validation
    score after each epoch. ``state_dict``/``load_state_dict`` checkpoint it.
    """

    def __init__(self, optimizer, name: str = "onecycle", *, epochs: int, steps_per_epoch: int,
                 pct_start: float = 0.2, step_size: int = 7, gamma: float = 0.1, plateau_patience: int = 2,
                 cycle_epochs: float = 2.0):
        if name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {name!r}")
        self.name, self.optimizer = name, optimizer
        lrs = [g["lr"] for g in optimizer.param_groups]
        cycle_momentum = any(k in optimizer.defaults for k in ("momentum", "betas")) and (
            optimizer.defaults.get("momentum", 1) > 0)
        lr_scheduler = torch.optim.lr_scheduler
        if name == "onecycle":
            self.scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=epochs * steps_per_epoch,
                                                     pct_start=pct_start, cycle_momentum=cycle_momentum)
        elif name == "cyclic":
            half = max(1, round(cycle_epochs * steps_per_epoch / 2))
            self.scheduler = lr_scheduler.CyclicLR(optimizer, base_lr=[lr / 10 for lr in lrs], max_lr=lrs,
                                                   step_size_up=half, cycle_momentum=cycle_momentum,
                                                   base_momentum=0.85, max_momentum=0.95)
        elif name == "step":
            self.scheduler = lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
        elif name == "plateau":
            self.scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=gamma,
                                                            patience=plateau_patience)
        else:
            self.scheduler = lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        self.per_batch = name in ("onecycle", "cyclic")

    def step(self) -> None:
        """After an optimizer step: advance a per-batch schedule."""
        if self.per_batch:
            self.scheduler.step()

    def epoch_end(self, score: float) -> None:
        """After an epoch's validation: advance a per-epoch schedule (``plateau`` reads ``score``)."""
        if self.name == "plateau":
            self.scheduler.step(score)
        elif not self.per_batch:
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def rescale(self, factor: float) -> None:
        """Multiply every group's rate (current, initial and the schedule's bounds) by ``factor``,
        mid-run: for resuming with a changed learning rate (population-based training)."""
        keys = ("lr", "initial_lr", "max_lr", "min_lr", "base_lr")
        for group in self.optimizer.param_groups:
            for k in keys:
                if k in group:
                    group[k] *= factor
        for attr in ("base_lrs", "max_lrs", "min_lrs"):
            if hasattr(self.scheduler, attr):
                setattr(self.scheduler, attr, [v * factor for v in getattr(self.scheduler, attr)])
        if hasattr(self.scheduler, "_last_lr"):
            self.scheduler._last_lr = self.get_last_lr()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
