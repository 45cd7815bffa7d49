"""Segmentation architectures by name: our FC-DenseNet presets or any segmentation-models-pytorch model.

An architecture is described by a small JSON-able dict, stored in a bundle's config.json::

    {"type": "fcdensenet", "preset": "fcdensenet_lite", "overrides": {}}
    {"type": "smp", "arch": "Unet", "encoder_name": "resnet18", "kwargs": {}}

smp models are always built offline (``encoder_weights=None``); pretrained encoder
weights are loaded by the caller from a local file. Names that could make smp or timm
contact a model hub are refused before anything is built: the encoder must be in smp's
encoder registry, or ``tu-<timm architecture>`` with a plain name from
``timm.list_models()`` (never ``tu-hf-hub:...``); ``kwargs`` may not set the encoder, its
weights, the channels or the classes.
"""
from __future__ import annotations

from torch import nn

from ..pretrained import check_timm_name
from .fcdensenet import FCDenseNet, create_fcdensenet

__all__ = ["build_segmentation_model", "check_smp_encoder", "size_divisor"]


def build_segmentation_model(architecture: dict, *, in_channels: int = 1, num_classes: int = 1) -> nn.Module:
    """Build an untrained network from an architecture dict (see module docstring)."""
    kind = architecture.get("type")
    if kind == "fcdensenet":
        overrides = dict(architecture.get("overrides", {}))
        overrides.update(in_channels=in_channels, num_classes=num_classes)
        return create_fcdensenet(architecture.get("preset", "fcdensenet_lite"), **overrides)
    if kind == "smp":
        import segmentation_models_pytorch as smp

        encoder_name = check_smp_encoder(architecture.get("encoder_name", "resnet34"))
        kwargs = architecture.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ValueError(f"smp kwargs must be an object, not {kwargs!r}")
        fixed = sorted(set(kwargs) & {"encoder_name", "encoder_weights", "in_channels", "classes", "arch"})
        if fixed:
            raise ValueError(f"smp kwargs may not set {fixed}: the encoder is named by encoder_name, its "
                             "weights are never downloaded, and channels/classes are fixed")
        arch = architecture.get("arch")
        if not isinstance(arch, str) or ":" in arch or "/" in arch:
            raise ValueError(f"smp arch must be an smp architecture name such as 'Unet', not {arch!r}")
        return smp.create_model(
            arch,
            encoder_name=encoder_name,
            encoder_weights=None,  # offline: never download
            in_channels=in_channels,
            classes=num_classes,
            **kwargs,
        )
    raise ValueError(f"unknown architecture type {kind!r}: expected 'fcdensenet' or 'smp'")


def check_smp_encoder(name) -> str:
    """``name`` if smp builds it without network access (``encoder_weights=None``): an encoder
    of smp's registry, or ``tu-<name>`` for a plain timm architecture.

    Raises:
        ValueError: hub names (``tu-hf-hub:...``, anything with ``:``) and unknown encoders.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"smp encoder_name must be a non-empty string, not {name!r}")
    if name.startswith("tu-"):
        check_timm_name(name.removeprefix("tu-"), "timm encoder (smp tu-)")
        return name
    from segmentation_models_pytorch.encoders import encoders

    if ":" in name or name not in encoders:
        raise ValueError(f"unknown or remote smp encoder {name!r}: use a name from smp's encoder registry "
                         "(segmentation_models_pytorch.encoders.get_encoder_names()) or 'tu-<timm architecture>'; "
                         "nothing is ever downloaded")
    return name


def size_divisor(model: nn.Module) -> int:
    """Input sides must be multiples of this."""
    if isinstance(model, FCDenseNet):
        return model.divisor
    return 32
