"""Weights bundles: one folder with ``model.safetensors`` and ``config.json``.

config.json describes how to rebuild the network and how to feed it (preprocessing,
normalisation), and records the SHA-256 of the weights file, which is checked on load:
a corrupt or swapped file is refused, never half-used. Weights load with safetensors
only, so no pickled code can run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import WeightsError
from .training import atomic_write

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(folder: str | os.PathLike, model: torch.nn.Module, config: dict, *,
                 dtype: torch.dtype = torch.float32) -> None:
    """Write ``model``'s state (floating tensors as ``dtype``) and ``config`` plus the weights' hash."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    config = {**config, "weights_dtype": str(dtype).removeprefix("torch."),
              "weights_sha256": sha256_file(folder / WEIGHTS_FILE)}
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=list)))


def read_bundle(folder: str | os.PathLike, what: str = "model") -> tuple[dict[str, torch.Tensor], dict]:
    """The verified state dict (floating tensors as float32) and config of a bundle.

    Raises:
        WeightsError: missing files, or a weights file that fails its recorded hash.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise WeightsError(f"{what} bundle {folder} lacks {path.name}; pass the folder that holds "
                               f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads(config_path.read_text())
    expected = config.get("weights_sha256")
    if expected and sha256_file(weights_path) != expected:
        raise WeightsError(f"{weights_path} does not match the SHA-256 recorded in {config_path}: "
                           "the file is corrupt or was replaced; restore it from the repository")
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights_path).items()}
    return state, config


def load_state(model: torch.nn.Module, state: dict, source: str | os.PathLike) -> torch.nn.Module:
    """``model.load_state_dict(state)``, a mismatch reported as ``WeightsError`` naming ``source``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: the weights do not fit the architecture in its config.json: {exc}") from exc
    return model
