"""Lung mask post-processing: threshold, keep the two largest components, fill holes."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_largest_components(mask: np.ndarray, keep: int = 2) -> np.ndarray:
    """The ``keep`` largest 8-connected components of a bool mask (two lungs by default)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= keep:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labels.ravel())[1:]
    kept = np.argsort(sizes)[::-1][:keep] + 1
    return np.isin(labels, kept)


def postprocess_mask(probability: np.ndarray, threshold: float = 0.5, keep: int = 2) -> np.ndarray:
    """Lung probability map -> clean bool mask (threshold, largest ``keep`` components, holes filled)."""
    mask = probability > threshold
    if keep:
        mask = keep_largest_components(mask, keep)
    return ndimage.binary_fill_holes(mask)
