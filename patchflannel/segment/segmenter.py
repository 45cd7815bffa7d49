"""The Stage 1 segmenter: CXR image(s) -> lung masks at the original and the working size."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..hub import default_bundle, resolve_bundle
from ..errors import WeightsError
from ..io import as_grey_float
from ..preprocess import Letterbox, SegmenterPreprocess, resize
from ..devices import autocast, resolve_device
from ..runtime import cache_folder, onnx_model, resolve_backend
from .bundle import load_bundle
from .gate import LungCheck
from .postprocess import postprocess_mask

__all__ = ["Segmentation", "Segmenter"]

@dataclass
class Segmentation:
    """One image's segmentation.

    Attributes:
        probability: lung probability at the network size ``(S, S)``, float32.
        mask: bool lung mask at the input's original size (``None`` if not requested).
        working_image: uint8 grey image letterboxed to ``working_size`` (aspect kept, zero-padded).
        working_mask: bool lung mask on the same letterboxed grid.
        letterbox: where the original sits in the working square.
        rejection: why the mask is implausible, or ``None``.
        lung_fraction: fraction of the image (not the padding) covered by the lung mask.
    """

    probability: np.ndarray
    mask: np.ndarray | None
    working_image: np.ndarray | None
    working_mask: np.ndarray | None
    letterbox: Letterbox | None
    rejection: str | None
    lung_fraction: float

    @property
    def ok(self) -> bool:
        return self.rejection is None

    @property
    def masked_working_image(self) -> np.ndarray:
        """The working image, zero outside the lung mask: what the patch learners see."""
        return np.where(self.working_mask, self.working_image, 0).astype(np.uint8)


class Segmenter:
    """Batched lung segmentation with a trained bundle.

    Examples:
        >>> from patchflannel.segment import Segmenter
        >>> from patchflannel.io import load_image
        >>> seg = Segmenter.from_bundle()                      # doctest: +SKIP
        >>> result = seg.segment(load_image("chest.png"))      # doctest: +SKIP
        >>> result.mask.shape == load_image("chest.png").shape  # doctest: +SKIP
        True
    """

    def __init__(self, model: torch.nn.Module, config: dict, *, device=None, amp: bool = True,
                 channels_last: bool = True, batch_size: int = 16, working_size: int = 1024,
                 lung_check: LungCheck = LungCheck(), name: str = ""):
        self.device = resolve_device(device)
        self.amp = amp
        self.channels_last = channels_last
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        #: The PyTorch network, also when `model` runs through another backend (`patchflannel.runtime`).
        self.torch_model = self.model
        self.backend = "torch"
        self.config = config
        self.preprocess = SegmenterPreprocess.from_dict(config["preprocess"])
        self.threshold = float(config.get("threshold", 0.5))
        self.batch_size = batch_size
        self.working_size = working_size
        self.lung_check = lung_check
        self.name = name
        #: Identifies weights + preprocessing in every output written with them.
        self.id = f"{name}@{config.get('weights_sha256', 'unknown')[:12]}"

    @classmethod
    def from_bundle(cls, folder: str | os.PathLike | None = None, *, verify: bool = True, backend: str = "torch",
                    **kwargs) -> Segmenter:
        """Load a bundle folder (default: the shipped FC-DenseNet, see `patchflannel.hub`).

        ``folder`` may also name a shipped bundle from any working directory
        (``weights/segmenter-unet-lite0`` or ``segmenter-unet-lite0``; see
        `patchflannel.hub.resolve_bundle`). Its config and weights are verified
        against their recorded hashes; ``verify=False`` (or ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1``)
        loads an unverified bundle, with a warning. ``backend``: see `use_backend`.
        """
        folder = folder if folder is not None else default_bundle("segmenter")
        folder = resolve_bundle(folder, "segmenter bundle")
        if not folder.is_dir():
            raise WeightsError(f"segmenter bundle {folder} is not a folder: pass a bundle folder or a shipped name "
                               "(see patchflannel.hub.SHIPPED)")
        model, config = load_bundle(folder, verify=verify)
        segmenter = cls(model, config, name=folder.name, **kwargs)
        segmenter.use_backend(backend, folder)
        return segmenter

    def use_backend(self, backend: str, folder: str | os.PathLike | None = None) -> None:
        """Run the network through ``backend`` (`patchflannel.runtime.BACKENDS`); an exported graph
        is cached beside the bundle ``folder`` (else in the user cache)."""
        backend = resolve_backend(backend, self.device)
        if backend == "onnxruntime":
            size = self.preprocess.size
            self.model = onnx_model(self.torch_model, (1, 1, size, size), cache_folder(folder))
        else:
            self.model = self.torch_model
        self.backend = backend

    def network_input(self, image: np.ndarray) -> np.ndarray:
        """Float grey image in [0, 1] -> normalised ``(S, S)`` network input."""
        return self.preprocess(image)

    @torch.inference_mode()
    def probabilities(self, inputs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Lung probabilities ``(N, S, S)`` for preprocessed network inputs ``(N, S, S)``."""
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(list(inputs))))[:, None]
        out = []
        for i in range(0, len(batch), self.batch_size):
            x = batch[i : i + self.batch_size].to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                out.append(torch.sigmoid(self.model(x).float())[:, 0].cpu())
        return torch.cat(out).numpy()

    def finish(self, image: np.ndarray, probability: np.ndarray, *, original_mask: bool = True,
               working: bool = True) -> Segmentation:
        """Masks from a probability map: at the original size and/or on the letterboxed working grid."""
        mask = content = None
        if original_mask:
            mask = postprocess_mask(resize(probability, image.shape[:2], interpolation=cv2.INTER_LINEAR), self.threshold)
        working_image = working_mask = box = None
        if working:
            box = Letterbox(image.shape[:2], self.working_size)
            working_image = box.apply(np.round(image * 255).astype(np.uint8))
            content = postprocess_mask(resize(probability, box.content_shape, interpolation=cv2.INTER_LINEAR),
                                       self.threshold)
            working_mask = box.place(content)
        checked = mask if mask is not None else content if content is not None else postprocess_mask(probability, self.threshold)
        return Segmentation(probability, mask, working_image, working_mask, box,
                            self.lung_check.reason(probability, self.threshold), float(checked.mean()))

    def segment_batch(self, images: Sequence[np.ndarray], **kwargs) -> list[Segmentation]:
        """Segment several float grey images (any sizes) in batched forward passes."""
        images = [as_grey_float(im) for im in images]
        probs = self.probabilities([self.network_input(im) for im in images])
        return [self.finish(im, p, **kwargs) for im, p in zip(images, probs)]

    def segment(self, image: np.ndarray, **kwargs) -> Segmentation:
        """Segment one grey image (float in [0, 1], or any array `to_grey_float` accepts)."""
        return self.segment_batch([image], **kwargs)[0]
