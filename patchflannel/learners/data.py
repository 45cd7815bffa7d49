"""Masked CXRs with labels for patch training and evaluation, held in memory.

Rows come from Stage 1 HDF5 packs (``python -m patchflannel.segment MANIFEST --h5 PACK``),
whose manifest columns carry ``label``, ``patient_id`` and ``source``. Labels outside
`CLASSES` (e.g. ``adult/``'s ``other_pneumonia``) are kept as rows with class index
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
from ..evaluation.splits import read_split, split_patients
from ..labels import CLASSES
from ..patches import extract_patches, rescale_film, sample_centres

__all__ = ["draw_patches", "FILE_INPUTS", "LEARNER_INPUTS", "WHOLE_INPUTS", "MaskedSet", "equalize_lung",
           "load_learner_inputs", "load_masked_set", "load_whole_image_set", "make_split", "read_rows",
           "style_balanced_weights"]


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
    """Read the pixels of ``rows`` (from `read_rows`) into memory. Pass the same
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


#: What a learner sees (``LearnerTrainConfig.input``), built by `load_learner_inputs`.
LEARNER_INPUTS: dict[str, str] = {
    "patches": "lung-centred patches of the lung-masked film (the method; the only input a Pipeline runs)",
    "patches_unmasked": "lung-centred patches of the unmasked film (ablation: what the mask does)",
    "whole_image": "the whole unmasked film letterboxed to the patch size (the baseline)",
    "whole_masked": "the whole lung-masked film resized to the patch size (ablation: what patches do)",
    "lung_box": "the lung-masked film cropped to the lungs' bounding box, letterboxed to the patch size",
}
#: Inputs a model sees in one piece (no patches), and inputs decoded from the original files.
WHOLE_INPUTS = ("whole_image", "whole_masked", "lung_box")
FILE_INPUTS = ("whole_image", "patches_unmasked")


def load_learner_inputs(rows: Sequence[dict], input: str = "patches", size: int = 224, *,
                        image_roots: dict[str, str | os.PathLike] | None = None, film_size: int | None = None,
                        equalize: bool = False, classes: Sequence[str] = CLASSES,
                        progress: bool = True) -> MaskedSet:
    """The films of ``rows`` as the learner of ``input`` (a key of `LEARNER_INPUTS`) sees
    them: working-size films and lung masks for patch inputs, ``size x size`` films for
    `WHOLE_INPUTS`.

    ``image_roots`` (pack -> folder of its manifest's relative paths) is needed for
    `FILE_INPUTS`. ``film_size`` resizes the films of patch inputs first, so that a
    patch covers ``working size / film_size`` times the field (patch scale). ``equalize``
    maps each film's intensities through the histogram of its lung pixels (of the whole film
    for ``whole_image``), a per-film equalisation that removes much of a device's grey-level
    signature.
    """
    if input not in LEARNER_INPUTS:
        raise ValueError(f"input must be one of {list(LEARNER_INPUTS)}, not {input!r}")
    if input in FILE_INPUTS and image_roots is None:
        raise ValueError(f"input {input!r} decodes the original films: pass image_roots (each pack's image folder)")
    if input == "whole_image":
        films = load_whole_image_set(rows, image_roots, size, classes, progress)
        if equalize:
            films.images = torch.stack([torch.from_numpy(equalize_lung(im.numpy(), m.numpy()))
                                        for im, m in zip(films.images, films.masks)])
        return films
    lungs = load_masked_set(rows, classes, progress)
    if input == "patches" and not film_size and not equalize:  # the packs hold exactly this
        return lungs
    images, masks = [], []
    for row, image, mask in zip(rows, lungs.images.numpy(), lungs.masks.numpy()):
        if input == "patches_unmasked":
            grey = load_image(Path(image_roots[row["pack"]]) / row["input"])
            image = Letterbox(grey.shape, mask.shape[0]).apply(np.round(grey * 255).astype(np.uint8))
        if equalize:
            image = equalize_lung(image, mask, keep_outside=input == "patches_unmasked")
        if input == "whole_masked":
            image, mask = rescale_film(image, mask, size, keep_outside=True)
        elif input == "lung_box":
            image, mask = _lung_box(image, mask, size)
        elif film_size:
            image, mask = rescale_film(image, mask, film_size, keep_outside=True)
        if input != "patches_unmasked":  # resampling smears lung pixels across the resized mask's edge
            image = np.where(mask, image, 0).astype(np.uint8)
        images.append(torch.from_numpy(np.ascontiguousarray(image)))
        masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
    return _as_set(rows, images, masks, classes)


def equalize_lung(image: np.ndarray, mask: np.ndarray, *, keep_outside: bool = False) -> np.ndarray:
    """``image`` (uint8) through the cumulative histogram of its ``mask`` pixels; zero outside
    the mask unless ``keep_outside`` (then the same mapping applies there too)."""
    lung = image[mask]
    if lung.size == 0:
        return image.copy()
    cdf = np.cumsum(np.bincount(lung, minlength=256)) / lung.size
    lut = np.round(cdf * 255).astype(np.uint8)
    return lut[image] if keep_outside else np.where(mask, lut[image], 0).astype(np.uint8)


def _lung_box(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box of the lungs (plus 2 % of the film each side), letterboxed to ``size``."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return rescale_film(image, mask, size, keep_outside=True)
    pad = round(0.02 * max(image.shape))
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, image.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + 1 + pad, image.shape[1])
    return rescale_film(image[y0:y1, x0:x1], mask[y0:y1, x0:x1], size, keep_outside=True)


def _as_set(rows: Sequence[dict], images: list, masks: list, classes: Sequence[str]) -> MaskedSet:
    if not rows:
        raise ValueError("no images selected")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index.get(r["label"], -1) for r in rows], dtype=np.int64)
    return MaskedSet(torch.stack(images), torch.stack(masks), labels, list(rows))


def draw_patches(data: MaskedSet, indices: torch.Tensor, k: int, size: int, generator: torch.Generator,
                 min_lung_pixels: int) -> torch.Tensor:
    """``k`` random lung patches of each image in ``indices``: ``(len * k, 1, size, size)`` float in [0, 1]."""
    centres = torch.stack([sample_centres(data.masks[i], k, generator=generator, min_pixels=min_lung_pixels)
                           for i in indices.tolist()])
    return extract_patches(data.images[indices][:, None], centres, size).float() / 255.0


def make_split(rows: list[dict], cfg) -> dict[str, str]:
    """``{patient_id: split}``: ``cfg.split_file`` if given, else seeded, stratified by source and label."""
    if cfg.split_file:
        split = read_split(cfg.split_file)
        missing = {r["patient_id"] for r in rows} - set(split)
        if missing:
            raise ValueError(f"{cfg.split_file} lacks {len(missing)} patients, e.g. {sorted(missing)[:3]}")
        return split
    return split_patients(rows, cfg.split_fractions, seed=cfg.seed, stratify_by=("source", "label"))


def style_balanced_weights(labels: np.ndarray, sources: list[str]) -> torch.Tensor:
    """Sampling weights that give every class the same share and, within a class, every
    ``source`` the same share of that class: a film weighs
    ``1 / (classes x sources of its class x films of its (source, class))``.

    With the class-balanced sampler, a source that holds most of a class sets that class's
    look (NIH films for adult normals, Kermany's for children). Here Cohen's few non-COVID
    adult films are drawn as often as the NIH normals, so "adult hospital style" no longer
    separates covid from the rest as cleanly.
    """
    labels = np.asarray(labels)
    cells: dict[tuple[int, str], int] = {}
    for label, source in zip(labels, sources):
        if label >= 0:
            cells[label, source] = cells.get((label, source), 0) + 1
    classes = {label for label, _ in cells}
    sources_of = {c: sum(label == c for label, _ in cells) for c in classes}
    weights = [0.0 if label < 0 else 1.0 / (len(classes) * sources_of[label] * cells[label, source])
               for label, source in zip(labels, sources)]
    return torch.as_tensor(weights, dtype=torch.float64)
