"""Segmenter bundles: ``model.safetensors`` + ``config.json`` in one folder (see `patchflannel.bundle`).

config.json records the architecture, the preprocessing, the mask threshold, the lung
convention learned, the SHA-256 of the weights file and of the config itself; both are
checked on load (``verify=False`` or ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1`` opt out, with a
warning).
"""
from __future__ import annotations

import os

import torch

from ..bundle import CONFIG_FILE, build_from_config, load_state, read_bundle, sha256_file, write_bundle
from ..errors import WeightsError
from ..hub import resolve_bundle
from ..preprocess import SegmenterPreprocess
from .model import build_segmentation_model

__all__ = ["load_bundle", "save_bundle", "sha256_file"]


def save_bundle(folder: str | os.PathLike, model: torch.nn.Module, *, architecture: dict,
                preprocess: SegmenterPreprocess, threshold: float = 0.5,
                convention: str = "v7: lung behind the heart included", extra: dict | None = None) -> None:
    """Write the model's weights (safetensors, fp32) and its config."""
    write_bundle(folder, model, {"task": "lung-segmentation", "architecture": architecture,
                                 "preprocess": preprocess.to_dict(), "threshold": threshold,
                                 "convention": convention, **(extra or {})})


def load_bundle(folder: str | os.PathLike, *, verify: bool = True) -> tuple[torch.nn.Module, dict]:
    """Build the model from config.json and load its verified weights (eval mode, CPU).

    Args:
        folder: the bundle folder, or the name of a shipped one (see
            `patchflannel.hub.resolve_bundle`).
        verify: ``False`` (or ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1``) loads a bundle whose
            hashes are missing or do not match, with a warning (see `patchflannel.bundle.read_bundle`).

    Raises:
        WeightsError: missing files, malformed JSON, a config or weights file that fails its
            recorded hash, an architecture that could download or cannot be built, an invalid
            threshold, or weights that do not fit the architecture.
    """
    folder = resolve_bundle(folder, "segmenter bundle")
    state, config = read_bundle(folder, "segmenter", verify=verify, required=("architecture", "preprocess"))
    config_path = folder / CONFIG_FILE
    architecture = config["architecture"]
    if not isinstance(architecture, dict):
        raise WeightsError(f"{config_path}: 'architecture' must be an object, not {architecture!r}")
    threshold = config.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise WeightsError(f"{config_path}: 'threshold' must be a number strictly between 0 and 1, not {threshold!r}")
    if not isinstance(config["preprocess"], dict):
        raise WeightsError(f"{config_path}: 'preprocess' must be an object, not {config['preprocess']!r}")
    model = build_from_config(lambda: build_segmentation_model(architecture), config_path, "segmentation network")
    return load_state(model, state, folder).eval(), config
