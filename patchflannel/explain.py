"""Grad-CAM over lung patches, aggregated into one whole-film heatmap per learner.

The "probabilistic Grad-CAM" of the patch-by-patch method: every patch gets a Grad-CAM map
for the class the pipeline predicted for the film; each map is placed where its patch was
cut and the maps are averaged where patches overlap; the result is restricted to the lung
mask. The ensemble map is the learners' maps weighted by the FLANNEL learner weights.

Grad-CAM (Selvaraju et al., 2017) of one patch: the activations ``A`` of the learner's last
convolution, weighted per channel by the spatial mean of ``d score / d A``, summed over
channels, ReLU. We write it here (about 40 lines) rather than use the ``grad-cam`` package:
that package min-max normalises each input's map on its own, which erases the differences
between patches that the overlap average is meant to keep, and its per-model wrapper holds
hooks between calls; here all K patches of all films go through in batches, the gradient is
taken with ``torch.autograd.grad`` (no graph survives a call) and the one forward hook is
removed in ``finally``, so memory stays flat over any number of films.

Examples:
    >>> from patchflannel import Pipeline
    >>> pipe = Pipeline.from_pretrained(k=32)                                  # doctest: +SKIP
    >>> pred = pipe.predict("chest.png", explain=True)                         # doctest: +SKIP
    >>> pred.heatmap.shape, pred.heatmap.max()          # on the working grid / 4   # doctest: +SKIP
    ((256, 256), 1.0)
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .patches import extract_patches, rescale_centres, rescale_film

__all__ = ["HEATMAP_STRIDE", "last_conv", "lung_heatmap", "patch_cams", "place_cams"]

#: Heatmaps are accumulated on the working grid divided by this (a 7x7 CAM per 224 px patch
#: has no finer detail to keep).
HEATMAP_STRIDE = 4


def last_conv(model: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` of ``model`` in registration order: the Grad-CAM layer."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer to take Grad-CAM from")
    return convs[-1]


def patch_cams(model: nn.Module, patches: torch.Tensor, targets: torch.Tensor, *,
               layer: nn.Module | None = None, batch_size: int = 8) -> torch.Tensor:
    """Grad-CAM of normalised ``patches`` ``(M, C, P, P)`` for class ``targets`` ``(M,)``.

    Returns ``(M, P, P)`` float32, non-negative, not normalised (the maps of one learner stay
    comparable across patches).
    """
    layer = layer or last_conv(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    out = []
    try:
        model.eval()
        for start in range(0, len(patches), batch_size):
            captured.clear()
            x = patches[start:start + batch_size].float().requires_grad_(True)  # a graph even for frozen weights
            with torch.enable_grad():
                logits = model(x)
                score = logits.float().gather(1, targets[start:start + batch_size, None].to(logits.device)).sum()
                (grad,) = torch.autograd.grad(score, captured[-1])
            act = captured[-1].detach()
            cam = F.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
            out.append(F.interpolate(cam.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu())
    finally:
        handle.remove()
        captured.clear()
    return torch.cat(out) if out else torch.zeros(0, *patches.shape[-2:])


def place_cams(cams: torch.Tensor, centres: torch.Tensor, shape: tuple[int, int],
               stride: int = HEATMAP_STRIDE) -> np.ndarray:
    """Average ``(K, P, P)`` patch maps over a ``shape`` grid where their patches overlap
    (pixels no patch covers are 0). Returned at ``shape / stride``."""
    h, w = shape[0] // stride, shape[1] // stride
    size = cams.shape[-1] // stride
    small = F.interpolate(cams[:, None].float(), size=(size, size), mode="area")
    # Scatter each patch with the indexing that cut it (extract_patches' zero-padded frame).
    half = size // 2
    total, count = torch.zeros(h + size, w + size), torch.zeros(h + size, w + size)
    for cam, (r, c) in zip(small[:, 0], (centres // stride).tolist()):
        total[r:r + size, c:c + size] += cam
        count[r:r + size, c:c + size] += 1
    inside = (slice(half, half + h), slice(half, half + w))
    return (total[inside] / count[inside].clamp_min(1)).numpy().astype(np.float32)


def lung_heatmap(models: Sequence[nn.Module], normalize, image: np.ndarray, mask: np.ndarray, centres,
                 target: int, *, patch_size: int = 224, weights: Sequence[float] | None = None,
                 device="cpu", batch_size: int = 8, stride: int = HEATMAP_STRIDE,
                 scales: Sequence[int | None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The probabilistic Grad-CAM of one film.

    Args:
        models: the patch learners.
        normalize: maps uint8 patches to the learners' input (``PatchEngine.normalize``).
        image: ``(H, W)`` uint8 masked working image; ``mask`` its bool lung mask.
        centres: ``(K, 2)`` patch centres (the ones the prediction used).
        target: class index explained (the predicted class).
        weights: per-learner weights of the ensemble map (default: equal).
        batch_size: patches per backward pass: peak memory grows with it (the activations
            of a backward pass), the time barely (see ``benchmarks/memory.py``).
        scales: per learner, the film side its patches come from (``PatchEngine.scales``;
            ``None``: this image's grid); a learner's map is computed at its scale and
            resampled to this grid.

    Returns:
        ``(ensemble_map, [map per learner])``, each ``(H / stride, W / stride)`` float32 in
        [0, 1], zero outside the lung.
    """
    centres = torch.as_tensor(np.asarray(centres), dtype=torch.long)
    grid = image.shape[0]
    sizes = [grid if s is None else int(s) for s in (scales or [None] * len(models))]
    targets = torch.full((len(centres),), int(target), dtype=torch.long)
    lung = cv2.resize(mask.astype(np.uint8), (mask.shape[1] // stride, mask.shape[0] // stride),
                      interpolation=cv2.INTER_NEAREST).astype(bool)
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
    maps = []
    for model, size in zip(models, sizes):
        if size not in inputs:  # the film and its patches at this scale, once
            film = image if size == grid else rescale_film(image, mask, size)[0]
            at = rescale_centres(centres, grid, size)
            inputs[size] = (normalize(extract_patches(torch.as_tensor(film)[None, None], at[None], patch_size))
                            .to(device), at, film.shape)
        x, at, shape = inputs[size]
        placed = place_cams(patch_cams(model, x, targets, batch_size=batch_size), at, shape, stride)
        if placed.shape != lung.shape:
            placed = cv2.resize(placed, (lung.shape[1], lung.shape[0]), interpolation=cv2.INTER_LINEAR)
        maps.append(np.where(lung, placed, 0.0).astype(np.float32))
    w = np.ones(len(maps)) if weights is None else np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    ensemble = sum(wi * _unit(m) for wi, m in zip(w, maps)) / max(w.sum(), 1e-8)
    return _unit(ensemble).astype(np.float32), [_unit(m) for m in maps]


def _unit(heatmap: np.ndarray) -> np.ndarray:
    top = float(heatmap.max())
    return (heatmap / top if top > 0 else heatmap).astype(np.float32)
