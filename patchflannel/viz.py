"""Pictures a person can look at: mask overlays and contact sheets (OpenCV, BGR uint8)."""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["contact_sheet", "explanation_figure", "heatmap_overlay", "mask_overlay"]


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


def heatmap_overlay(image: np.ndarray, mask: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """Grey uint8 ``image`` with a ``[0, 1]`` heatmap (any grid, resized to the image) blended
    in JET colours inside ``mask``, and the lung outlined."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    heat = cv2.resize(heatmap.astype(np.float32), image.shape[::-1], interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(colour, alpha, bgr, 1 - alpha, 0)
    bgr[mask] = blend[mask]
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(bgr, contours, -1, (255, 255, 255), max(1, image.shape[0] // 400))
    return bgr


def explanation_figure(pred, size: int = 512) -> np.ndarray:
    """One picture of an explained prediction (``Pipeline.predict(..., explain=True)``): the
    film with its lung outline and patch centres, the same film under the ensemble heatmap,
    and a panel with the predicted class, the probabilities, the uncertainty and each
    learner's label. BGR uint8."""
    if pred.heatmap is None or pred.working_image is None:
        raise ValueError(f"{pred.source}: no heatmap (predict with explain=True; rejected inputs have none)")
    scale = size / pred.working_image.shape[0]
    image = cv2.resize(pred.working_image, (size, size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(pred.mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    film = mask_overlay(image, mask, alpha=0.0)
    for y, x in pred.centres:
        cv2.circle(film, (int(x * scale), int(y * scale)), 3, (80, 80, 255), -1)
    heat = heatmap_overlay(image, mask, pred.heatmap)
    panel = np.full((size, 300, 3), 255, np.uint8)

    def text(line: str, y: int, colour=(0, 0, 0), scale_: float = 0.5, x: int = 10) -> None:
        cv2.putText(panel, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale_, colour, 1, cv2.LINE_AA)

    text(f"{pred.label}  {pred.probabilities[pred.label]:.2f}", 30, (0, 0, 160), 0.8)
    for i, (name, p) in enumerate(pred.probabilities.items()):
        y = 65 + 24 * i
        text(name, y)
        cv2.rectangle(panel, (100, y - 12), (100 + int(150 * p), y - 2), (80, 160, 60), -1)
        text(f"{p:.2f}", y, scale_=0.45, x=255)
    y = 180
    for key, value in (pred.uncertainty or {}).items():
        text(f"{key.replace('_', ' ')}: {value:.2f}", y, scale_=0.45)
        y += 20
    y += 10
    for name, learner in pred.learners.items():
        text(f"{name}: {learner['label']}", y, (90, 90, 90), 0.42)
        y += 18
    text("heatmap: Grad-CAM over the lung patches", size - 12, (90, 90, 90), 0.4)
    return np.hstack([film, heat, panel])
