"""Segmentation architectures by name: our FC-DenseNet presets or any segmentation-models-pytorch model.

An architecture is described by a small JSON-able dict, stored in a bundle's config.json::

    {"type": "fcdensenet", "preset": "fcdensenet_lite", "overrides": {}}
    {"type": "smp", "arch": "Unet", "encoder_name": "resnet18", "kwargs": {}}

smp models are always built offline (``encoder_weights=None``); pretrained encoder
weights are loaded by the caller from a local file.
"""
from __future__ import annotations

from torch import nn

from .fcdensenet import FCDenseNet, create_fcdensenet


def build_segmentation_model(architecture: dict, *, in_channels: int = 1, num_classes: int = 1) -> nn.Module:
    """Build an untrained network from an architecture dict (see module docstring)."""
    kind = architecture.get("type")
    if kind == "fcdensenet":
        overrides = dict(architecture.get("overrides", {}))
        overrides.update(in_channels=in_channels, num_classes=num_classes)
        return create_fcdensenet(architecture.get("preset", "fcdensenet_lite"), **overrides)
    if kind == "smp":
        import segmentation_models_pytorch as smp

        return smp.create_model(
            architecture["arch"],
            encoder_name=architecture.get("encoder_name", "resnet34"),
            encoder_weights=None,  # offline: never download
            in_channels=in_channels,
            classes=num_classes,
            **architecture.get("kwargs", {}),
        )
    raise ValueError(f"unknown architecture type {kind!r}: expected 'fcdensenet' or 'smp'")


def size_divisor(model: nn.Module) -> int:
    """Input sides must be multiples of this."""
    if isinstance(model, FCDenseNet):
        return model.divisor
    return 32
