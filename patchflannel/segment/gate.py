"""The input gate: is the segmenter's lung mask a plausible pair of lungs?

A classifier answers every input; the gate decides which inputs it may be asked about. It
reads only what the segmenter already produced (the lung probability map at the network
size), so it costs well under a millisecond per image. Each check stands for one way a
non-chest-X-ray input shows up in the mask:

* **area**: no lungs at all (a photograph, a blank page) or lungs everywhere (flat images).
* **two lungs**: a chest film has two lung fields side by side; one blob, or a second blob
  a fraction of the first's size, is a mask on something else.
* **position**: the lungs sit left and right of the midline, with overlapping heights,
  reaching down into the lower half of the film.
* **fragments**: a real film's raw mask is two lungs and a few specks; a photograph or a
  texture breaks into many blobs.
* **confidence**: on a real film the network is sure (probabilities near 0 or 1); on an
  image unlike its training data much of the map is undecided. The share of undecided
  pixels (probability in (0.2, 0.8)) inside the mask and over the whole image is the cheap
  second check the design asks for: it needs no stored training statistics and no second
  model.

The default limits come from the lung masks of every real film in the project's data
(about 2,800 films from five hospitals, adults and children) and a corpus of non-CXR
images; ``benchmarks/rejection.py`` measures both rejection rates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .postprocess import fill_holes

__all__ = ["LungCheck", "lung_features"]


def lung_features(probability: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Shape, position and confidence measures of a lung probability map ``(S, S)``.

    Returns ``area`` (mask fraction of the image), ``n_components`` (of the raw thresholded
    map), ``second_ratio`` (second-largest component's area over the largest's), ``left_x`` /
    ``right_x`` (centroid x of the left/right lung, as a fraction of the width), ``top_y`` /
    ``bottom_y`` (the mask's vertical extent, fractions of the height), ``height_overlap``
    (shared fraction of the two lungs' vertical extents), ``undecided`` (share of the mask's
    pixels whose probability lies in (0.2, 0.8)) and ``undecided_image`` (the same share over
    the whole map).
    """
    raw = (probability > threshold).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(raw, connectivity=8)
    h, w = probability.shape
    features = {"area": 0.0, "n_components": float(n - 1), "second_ratio": 0.0, "left_x": 0.0, "right_x": 0.0,
                "top_y": 0.0, "bottom_y": 0.0, "height_overlap": 0.0, "undecided": 1.0,
                "undecided_image": float(np.mean((probability > 0.2) & (probability < 0.8)))}
    if n <= 1:
        return features
    order = np.argsort(stats[1:, cv2.CC_STAT_AREA], kind="stable")[::-1][:2] + 1
    mask = fill_holes(np.isin(labels, order))
    features["area"] = float(mask.mean())
    areas = stats[order, cv2.CC_STAT_AREA].astype(float)
    features["second_ratio"] = float(areas[1] / areas[0]) if len(order) == 2 else 0.0
    xs = centroids[order, 0] / w
    features["left_x"], features["right_x"] = float(xs.min()), float(xs.max())
    top = stats[order, cv2.CC_STAT_TOP]
    bottom = top + stats[order, cv2.CC_STAT_HEIGHT]
    features["top_y"], features["bottom_y"] = float(top.min() / h), float(bottom.max() / h)
    if len(order) == 2:
        shared = min(bottom) - max(top)
        features["height_overlap"] = float(max(shared, 0) / max(min(bottom - top), 1))
    p = probability[mask]
    features["undecided"] = float(np.mean((p > 0.2) & (p < 0.8)))
    return features


@dataclass(frozen=True)
class LungCheck:
    """Plausibility limits on the lung mask; outside them the image is rejected, not classified.

    Attributes:
        min_area_fraction, max_area_fraction: mask area as a fraction of the image.
        min_second_ratio: the smaller lung's area over the larger's (0 switches the two-lung
            check off).
        max_centre_offset: how far (fraction of the width) each lung's centroid may sit on the
            wrong side of the midline.
        min_height_overlap: shared fraction of the two lungs' vertical extents.
        min_bottom: how far down (fraction of the height) the lungs must reach.
        max_components: most connected regions in the raw thresholded map.
        max_undecided: largest share of mask pixels with probability in (0.2, 0.8).
        max_undecided_image: the same over the whole map.

    The defaults sit just outside the range of every real film in the project's data (2,843
    films): ``benchmarks/rejection.py`` prints the measures of each input with ``--features``.
    """

    min_area_fraction: float = 0.03
    max_area_fraction: float = 0.85
    min_second_ratio: float = 0.1
    max_centre_offset: float = 0.05
    min_height_overlap: float = 0.3
    min_bottom: float = 0.5
    max_components: int = 8
    max_undecided: float = 0.2
    max_undecided_image: float = 0.1

    def reason(self, probability: np.ndarray, threshold: float = 0.5) -> str | None:
        """Why the map is implausible as a pair of lungs, or ``None`` when it is plausible."""
        return self.judge(lung_features(probability, threshold))

    def judge(self, f: dict[str, float]) -> str | None:
        """`reason` for features already measured by `lung_features`."""
        if f["area"] < self.min_area_fraction:
            return f"no plausible lungs found (lung area {f['area']:.1%} of the image, minimum {self.min_area_fraction:.0%})"
        if f["area"] > self.max_area_fraction:
            return f"implausible lung mask (lung area {f['area']:.1%} of the image, maximum {self.max_area_fraction:.0%})"
        if self.min_second_ratio and f["second_ratio"] < self.min_second_ratio:
            return (f"implausible lung mask: not two lungs (smaller region {f['second_ratio']:.0%} of the larger, "
                    f"minimum {self.min_second_ratio:.0%})")
        if f["left_x"] > 0.5 + self.max_centre_offset or f["right_x"] < 0.5 - self.max_centre_offset:
            return (f"implausible lung mask: lungs not on both sides of the midline (centroids at "
                    f"{f['left_x']:.0%} and {f['right_x']:.0%} of the width)")
        if f["height_overlap"] < self.min_height_overlap:
            return (f"implausible lung mask: the two regions are not side by side (vertical overlap "
                    f"{f['height_overlap']:.0%}, minimum {self.min_height_overlap:.0%})")
        if f["bottom_y"] < self.min_bottom:
            return (f"implausible lung mask: lungs end {f['bottom_y']:.0%} of the way down the image "
                    f"(minimum {self.min_bottom:.0%})")
        if f["n_components"] > self.max_components:
            return (f"implausible lung mask: {f['n_components']:.0f} separate regions (maximum "
                    f"{self.max_components})")
        if f["undecided_image"] > self.max_undecided_image:
            return (f"segmenter unsure this is a chest X-ray ({f['undecided_image']:.0%} of the image undecided, "
                    f"maximum {self.max_undecided_image:.0%})")
        if f["undecided"] > self.max_undecided:
            return (f"segmenter unsure this is a chest X-ray ({f['undecided']:.0%} of the lung mask undecided, "
                    f"maximum {self.max_undecided:.0%})")
        return None

    def to_dict(self) -> dict:
        return asdict(self)
