"""Preprocessing: small, documented steps shared by training and inference.

The segmenter default is the reference preprocessing of the patch-by-patch method
(Oh, Park & Ye, 2020): histogram equalisation computed on the full-resolution image,
gamma 0.5, resize to a square network input. `SegmenterPreprocess` bundles the
steps with their settings so the same object (serialised in the weights' config.json)
is applied in training and inference.

Examples:
    >>> import numpy as np
    >>> from patchflannel.preprocess import SegmenterPreprocess
    >>> image = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    >>> SegmenterPreprocess(size=128)(image).shape
    (128, 128)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

__all__ = ["Letterbox", "SegmenterPreprocess", "adjust_gamma", "equalization_lut", "equalize_histogram",
           "resize"]


def equalization_lut(image: np.ndarray, nbins: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Quantised levels of a float image in [0, 1] and the equalising look-up table over them."""
    levels = np.clip(image * (nbins - 1) + 0.5, 0, nbins - 1).astype(np.uint8 if nbins <= 256 else np.uint16)
    counts = np.bincount(levels.ravel(), minlength=nbins)
    cdf = np.cumsum(counts).astype(np.float64)
    cdf_min = cdf[np.flatnonzero(counts)[0]]
    span = cdf[-1] - cdf_min
    if span <= 0:  # constant image: nothing to equalise
        return levels, np.zeros(nbins, dtype=np.float32)
    return levels, np.clip((cdf - cdf_min) / span, 0.0, 1.0).astype(np.float32)


def equalize_histogram(image: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Histogram-equalise a float image in [0, 1]; returns float32 in [0, 1].

    Computed on whatever resolution it is given: call it before resizing so the
    histogram is the full-resolution one.
    """
    levels, lut = equalization_lut(image, nbins)
    return lut[levels]


def adjust_gamma(image: np.ndarray, gamma: float = 0.5) -> np.ndarray:
    """Power-law intensity transform ``image ** gamma`` for a float image in [0, 1]."""
    return np.power(np.clip(image, 0.0, 1.0), gamma, dtype=np.float32)


def resize(image: np.ndarray, shape: tuple[int, int], *, interpolation: int | None = None) -> np.ndarray:
    """Resize to ``(height, width)``: area averaging when shrinking, bilinear when enlarging."""
    height, width = shape
    if interpolation is None:
        shrinking = height * width < image.shape[0] * image.shape[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


@dataclass(frozen=True)
class Letterbox:
    """Where an image of ``source_shape`` sits inside a ``size x size`` square after
    resizing by ``scale`` with its aspect ratio kept and the rest zero-padded."""

    source_shape: tuple[int, int]
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.source_shape)

    @property
    def content_shape(self) -> tuple[int, int]:
        h, w = self.source_shape
        return max(1, round(h * self.scale)), max(1, round(w * self.scale))

    @property
    def offset(self) -> tuple[int, int]:
        ch, cw = self.content_shape
        return (self.size - ch) // 2, (self.size - cw) // 2

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of the image inside the square."""
        (y, x), (ch, cw) = self.offset, self.content_shape
        return y, x, y + ch, x + cw

    def place(self, content: np.ndarray) -> np.ndarray:
        """Zero-pad an array of ``content_shape`` into the square."""
        out = np.zeros((self.size, self.size), dtype=content.dtype)
        y0, x0, y1, x1 = self.content_box
        out[y0:y1, x0:x1] = content
        return out

    def apply(self, image: np.ndarray, *, interpolation: int | None = None) -> np.ndarray:
        """Resize ``image`` (of ``source_shape``) into the zero-padded square."""
        return self.place(resize(image, self.content_shape, interpolation=interpolation))


@dataclass(frozen=True)
class SegmenterPreprocess:
    """Image -> segmenter input, identical in training and inference.

    Attributes:
        size: side of the square network input (the image is resized without keeping
            its aspect ratio, as in the reference method; masks are resized back).
        equalize: histogram-equalise at full resolution first.
        gamma: power-law exponent applied after equalisation (1 = off).
        mean, std: normalisation of the [0, 1] result before it enters the network.
    """

    size: int = 256
    equalize: bool = True
    gamma: float = 0.5
    mean: float = 0.5
    std: float = 0.25

    def intensity(self, image: np.ndarray) -> np.ndarray:
        """Full-resolution intensity steps (equalisation, gamma) of a float image in [0, 1]."""
        if self.equalize:
            levels, lut = equalization_lut(image)
            if self.gamma != 1.0:  # gamma of the 256 table entries: same values, 1/1000 of the work
                lut = adjust_gamma(lut, self.gamma)
            return lut[levels]
        if self.gamma != 1.0:
            image = adjust_gamma(image, self.gamma)
        return image.astype(np.float32, copy=False)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        return ((image - self.mean) / self.std).astype(np.float32, copy=False)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Float grey image in [0, 1], any size -> normalised float32 ``(size, size)``."""
        return self.normalize(resize(self.intensity(image), (self.size, self.size)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SegmenterPreprocess:
        return cls(**d)
