"""Lung mask post-processing: threshold, keep the two largest components, fill holes.

OpenCV's connected components and contour filling do this at 1024 px in a few
milliseconds (scipy.ndimage's label + binary_fill_holes took ~50 ms), which matters
in the batch job where post-processing runs beside the network.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["fill_holes", "keep_largest_components", "postprocess_mask"]


def keep_largest_components(mask: np.ndarray, keep: int = 2) -> np.ndarray:
    """The ``keep`` largest 8-connected components of a bool mask (two lungs by default)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n - 1 <= keep:
        return mask.astype(bool, copy=True)
    areas = stats[1:, cv2.CC_STAT_AREA]
    lut = np.zeros(n, dtype=bool)
    lut[np.argsort(areas, kind="stable")[::-1][:keep] + 1] = True
    return lut[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every region enclosed by the mask (the inside of each outer contour)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros(mask.shape, dtype=np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool) | mask


def postprocess_mask(probability: np.ndarray, threshold: float = 0.5, keep: int = 2) -> np.ndarray:
    """Lung probability map -> clean bool mask (threshold, largest ``keep`` components, holes filled)."""
    mask = probability > threshold
    if keep:
        mask = keep_largest_components(mask, keep)
    return fill_holes(mask)
