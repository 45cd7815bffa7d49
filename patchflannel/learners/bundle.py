"""Patch-learner bundles: one folder per learner (``model.safetensors`` + ``config.json``), and
learner sets: a folder of such folders (e.g. ``weights/learners-lite/``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..bundle import CONFIG_FILE, load_state, read_bundle, write_bundle
from ..errors import WeightsError
from .registry import CLASSES, PRESETS, Normalization, create_learner

DEFAULT_LEARNERS = Path(__file__).resolve().parents[2] / "weights" / "learners-lite"


def save_learner(folder: str | os.PathLike, model: torch.nn.Module, *, name: str, patch_size: int = 224,
                 normalization: Normalization | None = None, classes=CLASSES, extra: dict | None = None,
                 dtype: torch.dtype = torch.float16) -> None:
    """Write a learner bundle. Weights are stored as float16 by default (half the size; they are
    loaded back as float32, and predictions agree with the float32 model to ~1e-3)."""
    write_bundle(folder, model, {"task": "patch-classification", "learner": name, "classes": list(classes),
                                 "patch_size": patch_size, "in_chans": 1,
                                 "normalization": (normalization or Normalization()).to_dict(), **(extra or {})}, dtype=dtype)


def load_learner(folder: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Build a learner from its bundle and load the verified weights (eval mode, CPU)."""
    state, config = read_bundle(folder, "learner")
    model = create_learner(config["learner"], len(config["classes"]), in_chans=config.get("in_chans", 1))
    return load_state(model, state, folder).eval(), config


def _order(name: str) -> tuple:
    for rank, members in enumerate(PRESETS.values()):
        if name in members:
            return (rank, members.index(name), name)
    return (len(PRESETS), 0, name)


def load_learner_set(folder: str | os.PathLike | None = None) -> tuple[dict[str, torch.nn.Module], dict]:
    """All learner bundles in the sub-folders of ``folder`` (default: the shipped ``lite`` set),
    as ``{name: model}`` in preset order, and the shared settings (classes, patch size,
    normalisation) they must agree on.

    Raises:
        WeightsError: no bundles, or bundles that disagree on classes, patch size or normalisation.
    """
    folder = Path(folder or os.environ.get("PATCHFLANNEL_LEARNERS", DEFAULT_LEARNERS))
    subfolders = sorted(p for p in folder.glob("*") if (p / CONFIG_FILE).is_file()) if folder.is_dir() else []
    if (folder / CONFIG_FILE).is_file():
        subfolders = [folder]
    if not subfolders:
        raise WeightsError(f"no learner bundles under {folder}: pass a folder of learner bundles "
                           "(each with config.json and model.safetensors), e.g. weights/learners-lite")
    loaded = [load_learner(p) for p in subfolders]
    # A Pipeline feeds the working-size masked film as it is: any other input would be silently wrong.
    other = [str(p) for p, (_, c) in zip(subfolders, loaded)
             if c.get("input", "patches") != "patches" or c.get("film_size") or c.get("equalize")]
    if other:
        raise WeightsError(f"{other} hold whole-image or ablation models (trained on other inputs than the "
                           "working-size masked film), not patch learners; keep them out of a learner set")
    loaded.sort(key=lambda mc: _order(mc[1]["learner"]))
    shared_keys = ("classes", "patch_size", "normalization")
    shared = {k: loaded[0][1][k] for k in shared_keys}
    for _, config in loaded[1:]:
        if any(config[k] != shared[k] for k in shared_keys):
            raise WeightsError(f"learner bundles under {folder} disagree on {shared_keys}; "
                               "a set must share classes, patch size and normalisation")
    return {config["learner"]: model for model, config in loaded}, shared
