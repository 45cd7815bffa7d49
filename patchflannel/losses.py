"""The losses of the three trainers: multiclass focal loss (weight module, optionally the
learners) and Dice + BCE (the segmenter)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FocalLoss", "class_alpha", "dice_bce_loss"]


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
        alpha: per-class weights ``(C,)`` (e.g. `class_alpha` of the training fold) or None.
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


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (per image, averaged)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2, 3))
    dice = (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return bce + (1 - dice).mean()
