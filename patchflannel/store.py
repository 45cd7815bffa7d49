"""Masked CXR stores: one ``.npz`` per image, or one HDF5 pack per dataset.

``.npz`` keys (written by :func:`write_masked_npz`: the zip-of-.npy format of
``np.savez_compressed``, deflate level 1 with run-length encoding, atomic):

========================  ======================================================
``masked_image``          uint8 ``(W, W)``: grey image letterboxed to the working size, zero outside the lung
``mask``                  bool ``(W, W)``: lung mask on the same grid
``orig_shape``            int64 ``(2,)``: original ``(height, width)``
``content_box``           int64 ``(4,)``: ``(y0, x0, y1, x1)`` of the image inside the square
``scale``                 float64: working pixels per original pixel
``segmenter``             str: weights id of the segmenter
``preprocess``            str: JSON of the segmenter preprocessing
``source``                str: the input file
``image`` (optional)      uint8 ``(W, W)``: the letterboxed image without masking
========================  ======================================================

HDF5 packs (:func:`pack_npz_files`) hold the same arrays stacked along a first axis,
chunked one image per chunk and LZF-compressed for fast random reads, plus the
manifest columns as string datasets; :class:`H5MaskedDataset` reads them from
DataLoader workers (each worker opens its own handle).
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .training import atomic_write

NPZ_ARRAY_KEYS = ("masked_image", "mask", "orig_shape", "content_box", "scale")


def savez_compressed(file, compresslevel: int = 1, **arrays) -> None:
    """``np.savez_compressed`` with a faster encoder (same zip-of-.npy deflate format, read by ``np.load``).

    Deflate level 1 with zlib's run-length strategy: a masked CXR is mostly runs of zeros,
    and this writes one ~2x faster than level-1 defaults and ~8x faster than numpy's fixed
    level, for files ~10 % larger than level 1 (measured on cxr4 films at 1024 px).
    """
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for key, value in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                _use_rle_deflate(f, compresslevel)
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def _use_rle_deflate(entry, level: int) -> None:
    """Swap a zip entry writer's deflate compressor for one with ``Z_RLE`` (any deflate stream
    is valid zip data; only the encoder's search changes). Left as is where zipfile differs."""
    if getattr(entry, "_compressor", None) is not None and hasattr(entry, "_compress_size"):
        entry._compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_RLE)


def write_masked_npz(path: str | os.PathLike, *, working_image: np.ndarray, working_mask: np.ndarray,
                     orig_shape: tuple[int, int], content_box: tuple[int, int, int, int], scale: float,
                     segmenter: str, preprocess: dict, source: str, keep_unmasked: bool = False,
                     compresslevel: int = 1) -> None:
    """Write one masked CXR as a compressed ``.npz`` (temp file + rename: never half-written)."""
    arrays = {
        "masked_image": np.where(working_mask, working_image, 0).astype(np.uint8),
        "mask": working_mask.astype(bool),
        "orig_shape": np.asarray(orig_shape, dtype=np.int64),
        "content_box": np.asarray(content_box, dtype=np.int64),
        "scale": np.float64(scale),
        "segmenter": np.str_(segmenter),
        "preprocess": np.str_(json.dumps(preprocess, sort_keys=True)),
        "source": np.str_(source),
    }
    if keep_unmasked:
        arrays["image"] = working_image.astype(np.uint8)

    def write(tmp):
        with open(tmp, "wb") as f:
            savez_compressed(f, compresslevel, **arrays)

    atomic_write(path, write)


def read_masked_npz(path: str | os.PathLike) -> dict:
    """All arrays of a masked ``.npz`` (strings as ``str``, ``preprocess`` as a dict)."""
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for key in ("segmenter", "source"):
        out[key] = str(out[key])
    out["preprocess"] = json.loads(str(out["preprocess"]))
    out["scale"] = float(out["scale"])
    return out


def pack_npz_files(npz_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                   columns: dict[str, Sequence[str]] | None = None, compression: str = "lzf") -> None:
    """Stack masked ``.npz`` files into one HDF5 file (atomic).

    ``columns`` are per-image strings (e.g. ``label``, ``patient_id``, ``source``) stored
    beside the arrays, in the order of ``npz_paths``.
    """
    import h5py

    npz_paths = [Path(p) for p in npz_paths]
    if not npz_paths:
        raise ValueError("no .npz files to pack")
    columns = dict(columns or {})
    for name, values in columns.items():
        if len(values) != len(npz_paths):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(npz_paths)} files")

    def write(tmp):
        with h5py.File(tmp, "w") as h5:
            first = read_masked_npz(npz_paths[0])
            size = first["masked_image"].shape
            n = len(npz_paths)
            images = h5.create_dataset("masked_image", (n, *size), np.uint8, chunks=(1, *size), compression=compression)
            masks = h5.create_dataset("mask", (n, *size), bool, chunks=(1, *size), compression=compression)
            meta = {k: h5.create_dataset(k, (n, *np.shape(first[k])), np.asarray(first[k]).dtype)
                    for k in ("orig_shape", "content_box", "scale")}
            str_dtype = h5py.string_dtype()
            sources = h5.create_dataset("npz", (n,), str_dtype)
            for i, p in enumerate(npz_paths):
                z = first if i == 0 else read_masked_npz(p)
                if z["masked_image"].shape != size:
                    raise ValueError(f"{p}: working size {z['masked_image'].shape} differs from {size}")
                images[i] = z["masked_image"]
                masks[i] = z["mask"]
                for k, ds in meta.items():
                    ds[i] = z[k]
                sources[i] = str(p)
            for name, values in columns.items():
                h5.create_dataset(f"columns/{name}", data=np.asarray([str(v) for v in values], dtype=object),
                                  dtype=str_dtype)
            h5.attrs["segmenter"] = first["segmenter"]
            h5.attrs["preprocess"] = json.dumps(first["preprocess"], sort_keys=True)

    atomic_write(out_path, write)


class H5MaskedDataset:
    """Random access to an HDF5 pack; safe in DataLoader workers (lazy per-process handle).

    ``dataset[i]`` is a dict with ``masked_image``, ``mask`` and every stored column.

    Example:
        >>> ds = H5MaskedDataset("cxr4.h5")            # doctest: +SKIP
        >>> ds[0]["masked_image"].shape                # doctest: +SKIP
        (1024, 1024)
    """

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = str(path)
        with h5py.File(self.path, "r") as h5:
            self.length = len(h5["masked_image"])
            self.columns = {k: [v.decode() if isinstance(v, bytes) else str(v) for v in h5["columns"][k][()]]
                            for k in (h5["columns"].keys() if "columns" in h5 else [])}
        self._h5 = None
        self._pid = None

    def _file(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():  # h5py handles must not cross fork()
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        h5 = self._file()
        item = {"masked_image": h5["masked_image"][index], "mask": h5["mask"][index]}
        for k in ("orig_shape", "content_box"):
            item[k] = h5[k][index]
        for k, values in self.columns.items():
            item[k] = values[index]
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = None
        return state
