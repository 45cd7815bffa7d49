"""Segmenter bundles: ``model.safetensors`` + ``config.json`` in one folder.

config.json records the architecture, the preprocessing, the mask threshold, the lung
convention learned, and the SHA-256 of the weights file, which is checked on load.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import WeightsError
from ..preprocess import SegmenterPreprocess
from ..training import atomic_write
from .model import build_segmentation_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(folder: str | os.PathLike, model: torch.nn.Module, *, architecture: dict,
                preprocess: SegmenterPreprocess, threshold: float = 0.5,
                convention: str = "v7: lung behind the heart included", extra: dict | None = None) -> None:
    """Write the model's weights (safetensors, contiguous fp32) and its config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    config = {
        "task": "lung-segmentation",
        "architecture": architecture,
        "preprocess": preprocess.to_dict(),
        "threshold": threshold,
        "convention": convention,
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        **(extra or {}),
    }
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=list)))


def load_bundle(folder: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Build the model from config.json and load its verified weights (eval mode, CPU).

    Raises:
        WeightsError: missing files, a weights file that fails its recorded hash, or
            weights that do not fit the architecture.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise WeightsError(f"segmenter bundle {folder} lacks {path.name}; pass the folder that holds "
                               f"{CONFIG_FILE} and {WEIGHTS_FILE} (e.g. weights/segmenter-fcdensenet)")
    config = json.loads(config_path.read_text())
    expected = config.get("weights_sha256")
    if expected and sha256_file(weights_path) != expected:
        raise WeightsError(f"{weights_path} does not match the SHA-256 recorded in {config_path}: "
                           "the file is corrupt or was replaced; restore it from the repository")
    model = build_segmentation_model(config["architecture"])
    try:
        model.load_state_dict(load_file(weights_path))
    except RuntimeError as exc:
        raise WeightsError(f"{weights_path} does not fit the architecture in {config_path}: {exc}") from exc
    return model.eval(), config
