"""Decoding chest X-ray files into float32 grey images in [0, 1], with clear refusals.

Handled: PNG, JPEG, TIFF, BMP (through Pillow: lazy header reads let us refuse
decompression bombs before decoding; EXIF orientation applied) and DICOM (through
pydicom: modality rescale and VOI LUT/windowing applied, MONOCHROME1 inverted).
8-bit images map 0..255 to 0..1; deeper integer and float images are rescaled from
their own min..max, since their stored range rarely fills the type's range.

Everything that cannot be used raises :class:`~patchflannel.errors.InvalidImageError`
naming the file and the reason.

Example:
    >>> from patchflannel.io import load_image
    >>> image = load_image("chest.png")          # doctest: +SKIP
    >>> image.dtype, float(image.min()) >= 0.0   # doctest: +SKIP
    (dtype('float32'), True)
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InvalidImageError

#: Default largest accepted image, in pixels (a 10000 x 10000 film); larger is refused
#: before decoding, so a small file declaring a huge image cannot exhaust memory.
MAX_PIXELS = 100_000_000
#: Default smallest accepted side, in pixels.
MIN_SIDE = 64

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


@dataclass(frozen=True)
class ImageLimits:
    """Acceptance limits applied to every decoded image."""

    max_pixels: int = MAX_PIXELS
    min_side: int = MIN_SIDE


def _is_dicom(path: Path, head: bytes) -> bool:
    return head[128:132] == b"DICM" or path.suffix.lower() in _DICOM_SUFFIXES


def _check_shape(name, shape: tuple[int, ...], limits: ImageLimits) -> None:
    h, w = shape[:2]
    if h * w > limits.max_pixels:
        raise InvalidImageError(name, f"image of {w}x{h} pixels exceeds the limit of {limits.max_pixels} pixels")
    if min(h, w) < limits.min_side:
        raise InvalidImageError(name, f"image of {w}x{h} pixels is smaller than {limits.min_side} px on a side")


def to_grey_float(array: np.ndarray, name: str | os.PathLike | None = None) -> np.ndarray:
    """Any 2-D grey, (H, W, 3) RGB or (H, W, 4) RGBA array -> float32 (H, W) in [0, 1].

    ``uint8`` is divided by 255; other integer and float arrays are rescaled from
    their min..max. NaN/inf, empty and wrongly shaped arrays are refused.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[..., :3].astype(np.float64)
        array_f = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma, as OpenCV/Pillow
    elif array.ndim == 3 and array.shape[2] == 1:
        array_f = array[..., 0]
    elif array.ndim == 2:
        array_f = array
    else:
        raise InvalidImageError(name, f"expected a 2-D grey or (H, W, 3/4) colour image, got shape {array.shape}")
    if array_f.size == 0:
        raise InvalidImageError(name, "image has no pixels")
    if array.dtype == np.bool_:
        raise InvalidImageError(name, "boolean array is a mask, not an image")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidImageError(name, f"unsupported pixel type {array.dtype}")
    if array.dtype == np.uint8:
        return (np.asarray(array_f, dtype=np.float32) / 255.0).astype(np.float32)
    array_f = np.asarray(array_f, dtype=np.float64)
    if not np.isfinite(array_f).all():
        raise InvalidImageError(name, "image contains NaN or infinite values")
    lo, hi = float(array_f.min()), float(array_f.max())
    if hi <= lo:
        return np.zeros(array_f.shape, dtype=np.float32)
    return ((array_f - lo) / (hi - lo)).astype(np.float32)


def check_size(image: np.ndarray, name: str | os.PathLike | None = None, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """``image`` itself, if its size is within ``limits`` (what :func:`load_image` applies to
    files); else :class:`InvalidImageError`."""
    _check_shape(name, np.shape(image), limits)
    return image


def as_grey_float(array: np.ndarray, name: str | os.PathLike | None = None) -> np.ndarray:
    """``array`` itself when it is already a float32 2-D grey image in [0, 1] (what
    :func:`load_image` returns), else :func:`to_grey_float` of it."""
    if (isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == 2 and array.size
            and bool(np.isfinite(array).all()) and float(array.min()) >= 0.0 and float(array.max()) <= 1.0):
        return array
    return to_grey_float(array, name)


def _load_dicom(path: Path, limits: ImageLimits) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise InvalidImageError(path, f"not a readable DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        raise InvalidImageError(path, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_shape(path, (rows, cols), limits)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise InvalidImageError(path, f"DICOM pixel data cannot be decoded ({exc})") from exc
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        pixels = apply_modality_lut(pixels, ds)
        pixels = apply_voi_lut(pixels, ds)
        image = to_grey_float(np.asarray(pixels, dtype=np.float64), path)
        if photometric == "MONOCHROME1":  # high values are dark: invert
            image = 1.0 - image
        return image
    return to_grey_float(pixels, path)


def _load_pillow(path: Path, limits: ImageLimits) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(path) as im:
                w, h = im.size
                _check_shape(path, (h, w), limits)  # before decoding a single pixel
                im.load()
                im = ImageOps.exif_transpose(im)
                mode = im.mode
                if mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif mode == "CMYK":
                    im = im.convert("RGB")
                elif mode in ("LA", "La", "PA") or mode == "1":
                    im = im.convert("L")
                array = np.asarray(im)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(path, f"image exceeds the pixel limit, refused as a possible decompression bomb ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidImageError(path, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InvalidImageError(path, f"corrupt or truncated image data ({exc})") from exc
    _check_shape(path, array.shape, limits)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N") or array.dtype == np.uint16:
        array = array.astype(np.uint16, copy=False)
    return to_grey_float(array, path)


def load_image(path: str | os.PathLike, *, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Read an image file and return it as a float32 grey ``(H, W)`` array in [0, 1].

    Raises:
        InvalidImageError: missing, empty, truncated, corrupt, non-image, too large or too
            small files, with the file name and the reason.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except FileNotFoundError as exc:
        raise InvalidImageError(path, "file does not exist") from exc
    except IsADirectoryError as exc:
        raise InvalidImageError(path, "is a directory, not an image file") from exc
    except OSError as exc:
        raise InvalidImageError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not head:
        raise InvalidImageError(path, "file is empty (0 bytes)")
    if _is_dicom(path, head):
        return _load_dicom(path, limits)
    return _load_pillow(path, limits)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lung mask image (any non-zero pixel is lung) as a bool ``(H, W)`` array."""
    return load_image(path, limits=ImageLimits(min_side=1)) > 0.5
