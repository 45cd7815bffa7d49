"""Masked CXRs with labels for patch training and evaluation, held in memory.

Rows come from Stage 1 HDF5 packs (``python -m patchflannel.segment MANIFEST --h5 PACK``),
whose manifest columns carry ``label``, ``patient_id`` and ``source``. Labels outside
:data:`CLASSES` (e.g. ``adult/``'s ``other_pneumonia``) are kept as rows with class index
-1: never trained on, available for external checks.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import load_image
from ..preprocess import Letterbox
from ..store import H5MaskedDataset
from .registry import CLASSES


@dataclass
class MaskedSet:
    """Images ``(N, H, W)`` uint8, masks ``(N, H, W)`` bool, and per-image metadata."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: np.ndarray  # class index, -1 for labels outside CLASSES
    rows: list[dict]  # label, patient_id, source, pack, index

    def __len__(self) -> int:
        return len(self.rows)


def read_rows(packs: Sequence[str | os.PathLike]) -> list[dict]:
    """Metadata rows of every image in the packs (no pixels read)."""
    rows = []
    for pack in packs:
        ds = H5MaskedDataset(pack)
        for column in ("label", "patient_id", "source"):
            if column not in ds.columns:
                raise ValueError(f"{pack} has no {column!r} column; pack a manifest with label, patient_id "
                                 f"and source columns (python -m patchflannel.segment MANIFEST --h5 ...)")
        for i in range(len(ds)):
            rows.append({**{k: v[i] for k, v in ds.columns.items()}, "pack": str(pack), "index": i})
    return rows


def load_masked_set(rows: Sequence[dict], classes: Sequence[str] = CLASSES, progress: bool = True,
                    handles: dict[str, H5MaskedDataset] | None = None) -> MaskedSet:
    """Read the pixels of ``rows`` (from :func:`read_rows`) into memory. Pass the same
    ``handles`` dict to successive calls to keep the packs open between them."""
    handles = {} if handles is None else handles
    images, masks = [], []
    for row in tqdm(rows, desc="reading", disable=not progress, leave=False):
        if row["pack"] not in handles:  # opening a pack reads all its columns: once per pack
            handles[row["pack"]] = H5MaskedDataset(row["pack"])
        ds = handles[row["pack"]]
        item = ds[row["index"]]
        images.append(torch.from_numpy(item["masked_image"]))
        masks.append(torch.from_numpy(item["mask"]))
    return _as_set(rows, images, masks, classes)


def load_whole_image_set(rows: Sequence[dict], image_roots: dict[str, str | os.PathLike], size: int = 224,
                         classes: Sequence[str] = CLASSES, progress: bool = True) -> MaskedSet:
    """The original, unmasked films of ``rows`` letterboxed to ``size x size`` uint8 (for
    whole-image baselines). ``image_roots`` maps each row's pack to the folder its manifest's
    relative ``input`` paths start from; ``masks`` mark the letterbox content."""
    images, masks = [], []
    for row in tqdm(rows, desc="decoding", disable=not progress, leave=False):
        if row["pack"] not in image_roots:
            raise ValueError(f"no image folder given for pack {row['pack']}")
        grey = load_image(Path(image_roots[row["pack"]]) / row["input"])
        box = Letterbox(grey.shape, size)
        images.append(torch.from_numpy(np.round(box.apply(grey) * 255).astype(np.uint8)))
        masks.append(torch.from_numpy(box.place(np.ones(box.content_shape, dtype=bool))))
    return _as_set(rows, images, masks, classes)


def _as_set(rows: Sequence[dict], images: list, masks: list, classes: Sequence[str]) -> MaskedSet:
    if not rows:
        raise ValueError("no images selected")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index.get(r["label"], -1) for r in rows], dtype=np.int64)
    return MaskedSet(torch.stack(images), torch.stack(masks), labels, list(rows))
