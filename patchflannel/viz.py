"""Pictures a person can look at: mask overlays and contact sheets (OpenCV, BGR uint8)."""
from __future__ import annotations

import cv2
import numpy as np


def mask_overlay(image: np.ndarray, mask: np.ndarray, *, color=(0, 200, 255), alpha: float = 0.25,
                 label: str | None = None) -> np.ndarray:
    """Grey uint8 image with the mask tinted and outlined; optional caption at the top."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    tint = bgr.copy()
    tint[mask] = color
    bgr = cv2.addWeighted(tint, alpha, bgr, 1 - alpha, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(bgr, contours, -1, color, max(1, image.shape[0] // 256))
    if label:
        scale = image.shape[0] / 700
        cv2.putText(bgr, label, (6, int(24 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, int(2 * scale)), cv2.LINE_AA)
    return bgr


def contact_sheet(tiles: list[np.ndarray], columns: int = 6, tile_size: int = 256) -> np.ndarray:
    """Tiles resized to ``tile_size`` squares, laid out in rows of ``columns``."""
    tiles = [cv2.resize(t, (tile_size, tile_size), interpolation=cv2.INTER_AREA) for t in tiles]
    rows = -(-len(tiles) // columns)
    sheet = np.zeros((rows * tile_size, columns * tile_size, 3), dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * tile_size : (r + 1) * tile_size, c * tile_size : (c + 1) * tile_size] = t
    return sheet
