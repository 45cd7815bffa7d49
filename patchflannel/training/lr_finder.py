"""Learning-rate range test (Smith 2017; the "LR finder" of fastai): train a few hundred steps
while the learning rate grows exponentially, record the smoothed loss, suggest a range.

The learner trainer runs it on its own data and model with ``--find-lr``
(``python -m patchflannel.learners.train ... --find-lr``); `lr_range_test` takes any
``step`` callable for other models.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["lr_range_test", "save_lr_plot", "suggest", "write_lr_result"]


def lr_range_test(step, optimizer, *, start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100,
                  smoothing: float = 0.98, diverge: float = 4.0) -> dict:
    """Sweep the learning rate of ``optimizer`` from ``start_lr`` to ``end_lr`` over ``steps``
    calls of ``step()`` (one optimisation step at the current rate, returning its loss).

    Parameter groups keep their ratios (discriminative rates): the last group follows the
    sweep. Stops early when the smoothed loss exceeds ``diverge`` x its minimum. Returns the
    rates, raw and smoothed (bias-corrected exponential average) losses and `suggest`'s
    suggestions.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError("need 0 < start_lr < end_lr")
    head = optimizer.param_groups[-1]["lr"]
    ratios = [g["lr"] / head for g in optimizer.param_groups]
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / max(steps - 1, 1))
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        loss = float(step())
        average = smoothing * average + (1 - smoothing) * loss
        value = average / (1 - smoothing ** (i + 1))
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(value)
        if not math.isfinite(value) or value > diverge * best:
            break
        best = min(best, value)
    return {"lr": lrs, "loss": losses, "smoothed_loss": smoothed, **suggest(lrs, smoothed)}


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 5) -> dict:
    """``steepest``: the rate where the smoothed loss falls fastest per decade (before its
    minimum); ``minimum``: the
    rate of the lowest smoothed loss; ``suggested_range``: ``[steepest, minimum / 10]`` in
    increasing order (for a cyclical or one-cycle schedule; ``minimum / 10`` alone is the
    usual single rate)."""
    lrs_a, loss_a = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    if len(lrs_a) < skip_start + 3:
        raise ValueError(f"the sweep stopped after {len(lrs_a)} steps: start lower or run more steps")
    lrs_a, loss_a = lrs_a[skip_start:], loss_a[skip_start:]
    minimum = float(lrs_a[int(np.nanargmin(loss_a))])
    # Slope per decade over a window of a twentieth of the sweep, not between neighbours: the
    # minibatch noise of single steps would otherwise pick a random early point.
    h = max(2, len(lrs_a) // 20)
    log_lr = np.log10(lrs_a)
    slope = np.full(len(lrs_a), np.inf)
    slope[h:-h] = (loss_a[2 * h:] - loss_a[:-2 * h]) / (log_lr[2 * h:] - log_lr[:-2 * h])
    before_minimum = slope[: int(np.nanargmin(loss_a)) + 1]
    steepest = float(lrs_a[int(np.argmin(before_minimum))]) if np.isfinite(before_minimum).any() else minimum / 10
    low, high = sorted((steepest, minimum / 10))
    return {"steepest": steepest, "minimum": minimum, "suggested_range": [low, high]}


def save_lr_plot(result: dict, path: str | os.PathLike, title: str = "learning-rate range test") -> None:
    """Loss (raw and smoothed) against the learning rate, log scale, suggestions marked (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the LR-finder plot needs matplotlib: pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(result["lr"], result["loss"], color="0.8", lw=0.8, label="loss")
    ax.plot(result["lr"], result["smoothed_loss"], color="C0", label="smoothed")
    ax.axvline(result["steepest"], color="C2", ls="--", label=f"steepest {result['steepest']:.1e}")
    ax.axvline(result["minimum"] / 10, color="C3", ls=":", label=f"minimum/10 {result['minimum'] / 10:.1e}")
    ax.axvspan(*result["suggested_range"], color="C2", alpha=0.1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    top = np.nanpercentile(result["smoothed_loss"], 95) * 1.2
    ax.set_ylim(min(result["smoothed_loss"]) * 0.9, top)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_lr_result(result: dict, out_dir: str | os.PathLike, title: str = "learning-rate range test") -> None:
    """``lr_find.json`` and ``lr_find.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lr_find.json").write_text(json.dumps(result, indent=1))
    save_lr_plot(result, out_dir / "lr_find.png", title)
