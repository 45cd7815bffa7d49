"""Segmenter bundles: ``model.safetensors`` + ``config.json`` in one folder (see :mod:`patchflannel.bundle`).

config.json records the architecture, the preprocessing, the mask threshold, the lung
convention learned, and the SHA-256 of the weights file, which is checked on load.
"""
from __future__ import annotations

import os

import torch

from ..bundle import load_state, read_bundle, sha256_file, write_bundle
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


def load_bundle(folder: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Build the model from config.json and load its verified weights (eval mode, CPU).

    Raises:
        WeightsError: missing files, a weights file that fails its recorded hash, or
            weights that do not fit the architecture.
    """
    state, config = read_bundle(folder, "segmenter")
    model = build_segmentation_model(config["architecture"])
    return load_state(model, state, folder).eval(), config
