"""Batched patch inference: N images x K lung patches x L learners in one call.

Patches are sampled and cut once per batch of images, on the device where the images
are, shared by every learner, and forwarded in large batches under
``torch.inference_mode()`` with channels_last and autocast. Per learner and image the
engine returns the mean softmax over the K patches (what the ensemble consumes) and the
majority vote with its vote fractions (the published method's confidence score).

Examples:
    >>> engine = PatchEngine({"resnet18": create_learner("resnet18")}, k=8)   # doctest: +SKIP
    >>> out = engine.predict(images, masks)                                    # doctest: +SKIP
    >>> out.probs.shape      # (N, L, C)                                       # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import autocast, resolve_device
from ..labels import CLASSES
from ..runtime import cache_folder, onnx_model, resolve_backend
from ..patches import EmptyMaskError, extract_patches, image_seed, rescale_centres, rescale_film, sample_centres
from .data import load_masked_set
from .registry import Normalization

__all__ = ["PatchEngine", "PatchPredictions", "predict_probs", "settled", "vote"]

log = logging.getLogger(__name__)


@dataclass
class PatchPredictions:
    """Outputs for N images, L learners, C classes (rows of rejected images are NaN / -1).

    Attributes:
        learners: learner names, in the order of axis 1.
        probs: ``(N, L, C)`` mean softmax over the K patches.
        votes: ``(N, L, C)`` fraction of patches whose argmax is each class.
        labels: ``(N, L)`` majority-vote class index (ties go to the higher mean probability).
        centres: ``(N, K, 2)`` patch centres (row, col) on the working grid.
        rejected: per image ``None`` or the reason it was not classified.
        patch_probs: ``(N, L, K, C)`` per-patch softmax when requested, else ``None`` (NaN
            for patches an adaptive run did not need).
        used: ``(N,)`` patches each image was classified from (K unless adaptive; 0 if rejected).
    """

    learners: list[str]
    probs: torch.Tensor
    votes: torch.Tensor
    labels: torch.Tensor
    centres: torch.Tensor
    rejected: list[str | None]
    patch_probs: torch.Tensor | None = None
    classes: tuple[str, ...] = field(default=CLASSES)
    used: torch.Tensor | None = None


def settled(patch_probs: torch.Tensor, k: int, z: float = 3.0) -> bool:
    """Whether ``n`` patches already decide the label that all ``k`` would give.

    ``patch_probs`` ``(L, n, C)``: the learners' softmax of the first ``n`` patches. On the
    learners' mean per patch, the margin ``d`` between the leading class and the runner-up
    of the current mean is a mean of per-patch margins; the ``k - n`` patches still to come
    can pull the final mean margin down by their share of it, so the label is settled when
    ``mean(d) > z * (k - n) / k * std(d) * sqrt(1/n + 1/(k - n))`` (a normal bound on the
    final margin over the remaining and the already-seen patches). ``n == k`` is always settled.
    """
    n = patch_probs.shape[1]
    if n >= k:
        return True
    if n < 2:
        return False
    per_patch = patch_probs.float().mean(0)  # (n, C): the learners' mean
    top2 = per_patch.mean(0).topk(2).indices
    margins = per_patch[:, top2[0]] - per_patch[:, top2[1]]
    bound = z * (k - n) / k * float(margins.std()) * (1 / n + 1 / (k - n)) ** 0.5
    return float(margins.mean()) > bound


def vote(patch_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(..., K, C)`` patch softmax -> mean softmax ``(..., C)``, vote fractions ``(..., C)`` and
    the majority label ``(...)``; ties between equally voted classes go to the higher mean probability."""
    mean = patch_probs.mean(-2)
    counts = torch.nn.functional.one_hot(patch_probs.argmax(-1), patch_probs.shape[-1]).sum(-2)
    votes = counts.float() / patch_probs.shape[-2]
    labels = (counts.float() + 0.5 * mean).argmax(-1)  # mean < 1, so it only breaks ties
    return mean, votes, labels


class PatchEngine:
    """Batched inference for a set of patch learners.

    Args:
        learners: ``{name: module}`` (or a sequence of modules, named by position).
        k: patches per image.
        patch_size: patch side in working-grid pixels.
        normalization: grey-level normalisation the learners were trained with.
        device: ``"auto"`` (cuda when present), ``"cpu"``, ``"cuda"``...
        amp: bf16 autocast on CPU, bf16/fp16 on GPU.
        batch_size: patches per forward pass (all learners use the same patches); halved
            automatically when a GPU runs out of memory.
        channels_last: memory format for the forward passes.
        compile: wrap each learner in ``torch.compile``.
        seed: base seed; each image's centres come from a generator seeded by its content
            (or the seed passed to `predict`) and this seed, so the same image gives the
            same patches anywhere in any batch.
        min_lung_pixels: masks with fewer lung pixels are rejected, not sampled.
        adaptive: classify each image from as few of its K patches as decide its label
            (`settled`): patches in rounds of ``adaptive_round``, from ``adaptive_min``
            on, never more than K; the patches are the first ones of the same stream, so the
            result at K is the same as without.
        adaptive_z: the bound's width (larger: more patches, closer to fixed K).
        scales: per learner (a mapping by name, or a sequence in learner order), the side of the
            film its patches are cut from (its bundle's ``working_size``); ``None`` or a
            learner missing from the mapping: the grid of the images passed to `predict`.
            The centres are drawn once, on that grid, and moved to each scale, so every
            learner looks at the same places; each film is resized once per scale and the
            patches of a scale are cut once for all its learners.
    """

    def __init__(self, learners: Mapping[str, nn.Module] | Sequence[nn.Module], *, k: int = 100,
                 patch_size: int = 224, normalization: Normalization | None = None, device="auto",
                 amp: bool = True, batch_size: int = 128, channels_last: bool = True, compile: bool = False,
                 seed: int = 0, min_lung_pixels: int = 1000,
                 scales: Mapping[str, int] | Sequence[int | None] | None = None, adaptive: bool = False,
                 adaptive_round: int = 8, adaptive_min: int = 16, adaptive_z: float = 3.0):
        if not isinstance(learners, Mapping):
            learners = {f"learner{i}": m for i, m in enumerate(learners)}
        if scales is None or isinstance(scales, Mapping):
            self.scales = [None if scales is None else scales.get(name) for name in learners]
        else:
            if len(scales) != len(learners):
                raise ValueError(f"{len(scales)} scales for {len(learners)} learners")
            self.scales = list(scales)
        self.device = resolve_device(device)
        self.names = list(learners)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.models = [m.eval().to(self.device, memory_format=memory_format) for m in learners.values()]
        #: The PyTorch networks (Grad-CAM, saving), also when `models` run through another backend.
        self.torch_models = list(self.models)
        if compile:
            self.models = [torch.compile(m) for m in self.models]
        self.k, self.patch_size, self.normalization = k, patch_size, normalization or Normalization()
        self.amp, self.batch_size, self.memory_format = amp, batch_size, memory_format
        self.seed, self.min_lung_pixels = seed, min_lung_pixels
        self.backend = "torch"
        self.adaptive, self.adaptive_round, self.adaptive_min, self.adaptive_z = (adaptive, adaptive_round,
                                                                                  adaptive_min, adaptive_z)

    def use_backend(self, backend: str, folders: Mapping[str, str | os.PathLike] | None = None) -> None:
        """Run the learners through ``backend`` (`patchflannel.runtime.BACKENDS`); exported graphs
        are cached beside ``folders[name]``, each learner's bundle (else in the user cache)."""
        backend = resolve_backend(backend, self.device)
        if backend == "onnxruntime":
            side = self.patch_size
            self.models = [onnx_model(m, (1, 1, side, side), cache_folder((folders or {}).get(name)))
                           for name, m in zip(self.names, self.torch_models)]
        else:
            self.models = list(self.torch_models)
        self.backend = backend

    def sample(self, images: torch.Tensor, masks: torch.Tensor,
               seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, list[str | None]]:
        """Centres ``(N, K, 2)`` for each image (zeros for rejected ones) and the rejections;
        ``seeds`` (one per image) replace the hash of each image's content."""
        centres = torch.zeros(len(images), self.k, 2, dtype=torch.long, device=masks.device)
        rejected: list[str | None] = []
        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
        for i in range(len(images)):
            seed = image_seed(images[i], self.seed) if seeds is None else int(seeds[i])
            generator = torch.Generator().manual_seed(seed)
            try:
                centres[i] = sample_centres(masks[i], self.k, generator=generator, min_pixels=self.min_lung_pixels)
                rejected.append(None)
            except EmptyMaskError as exc:
                rejected.append(f"empty or implausibly small lung mask: {exc}")
        return centres, rejected

    def _as_batch(self, x) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            x = torch.stack([torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a for a in x])
        x = torch.as_tensor(x)
        return x.to(self.device)

    @torch.inference_mode()
    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Softmax ``(L, M, C)`` of every learner for ``M`` uint8/float patches ``(M, 1, P, P)``.

        On a GPU that runs out of memory the batch size is halved and the pass retried.
        """
        return torch.stack([self.forward_patches_with(model, patches) for model in self.models])

    def scaled_films(self, images: torch.Tensor, masks: torch.Tensor, size: int) -> torch.Tensor:
        """``images`` ``(N, H, H)`` (masked films) at ``size`` px, as learners of that
        ``working_size`` were trained on them (`patchflannel.patches.rescale_film`)."""
        if size == images.shape[-1]:
            return images
        as_uint8 = images if images.dtype == torch.uint8 else (images.float() * 255).round().to(torch.uint8)
        small = [rescale_film(im, m, size)[0] for im, m in zip(as_uint8.cpu().numpy(), masks.cpu().numpy())]
        return torch.from_numpy(np.stack(small)).to(images.device)

    def _forward_scales(self, images: torch.Tensor, masks: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Softmax ``(L, N * K, C)``: each learner on the patches of its scale, cut once per scale."""
        grid = images.shape[-1]
        sizes = [grid if s is None else int(s) for s in self.scales]
        if len(set(sizes)) == 1 and sizes[0] == grid:  # one scale: one cut, every learner
            return self.forward_patches(extract_patches(images[:, None], centres, self.patch_size))
        out: list[torch.Tensor | None] = [None] * len(self.models)
        for size in sorted(set(sizes), reverse=True):
            films = self.scaled_films(images, masks, size)
            patches = extract_patches(films[:, None], rescale_centres(centres, grid, size), self.patch_size)
            for i in (i for i, s in enumerate(sizes) if s == size):
                out[i] = self.forward_patches_with(self.models[i], patches)
        return torch.stack(out)

    @torch.inference_mode()
    def forward_patches_with(self, model: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """Softmax ``(M, C)`` of one learner for ``M`` patches (batch halved on a GPU out of memory)."""
        while True:
            try:
                return self._forward_one(model, patches)
            except torch.OutOfMemoryError:
                if self.device.type != "cuda" or self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size //= 2
                log.warning("out of device memory: patch batch size lowered to %d", self.batch_size)

    def _forward_one(self, model: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        chunks = []
        for start in range(0, len(patches), self.batch_size):
            x = self.normalize(patches[start:start + self.batch_size]).contiguous(memory_format=self.memory_format)
            with autocast(self.device, self.amp):
                chunks.append(model(x).float().softmax(-1))
        return torch.cat(chunks)

    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        scale = 255.0 if patches.dtype == torch.uint8 else 1.0
        return (patches.float() / scale - self.normalization.mean) / self.normalization.std

    @torch.inference_mode()
    def predict(self, images, masks, *, seeds: Sequence[int] | None = None,
                return_patch_probs: bool = False) -> PatchPredictions:
        """Classify N images from K lung patches each, with every learner.

        Args:
            images: ``(N, H, W)`` uint8 (0-255) or float (0-1) masked working-size images, as a
                tensor, array or list of arrays (e.g. ``masked_image`` of the Stage 1 store).
            masks: ``(N, H, W)`` bool lung masks on the same grid.
            seeds: one patch-sampling seed per image (e.g. `image_seed`
                of the decoded, unmasked input, as `Pipeline` passes);
                default: a hash of each image given here, which changes with its mask.
            return_patch_probs: also return every patch's softmax.
        """
        images, masks = self._as_batch(images), self._as_batch(masks).bool()
        if images.ndim != 3 or masks.shape != images.shape:
            raise ValueError(f"images and masks must both be (N, H, W); got {tuple(images.shape)} and {tuple(masks.shape)}")
        n, num_learners = len(images), len(self.models)
        centres, rejected = self.sample(images, masks, seeds)
        keep = [i for i, r in enumerate(rejected) if r is None]
        full = torch.full((n, num_learners, self.k, len(CLASSES)), float("nan"))
        used = torch.zeros(n, dtype=torch.long)
        if keep and not self.adaptive:
            probs = self._forward_scales(images[keep], masks[keep], centres[keep])
            full = torch.full((n, num_learners, self.k, probs.shape[-1]), float("nan"))
            full[keep] = probs.reshape(num_learners, len(keep), self.k, -1).transpose(0, 1).cpu()
            used[keep] = self.k
        elif keep:
            full, used = self._forward_adaptive(images, masks, centres, keep, full, used)
        shape = (n, num_learners, full.shape[-1])
        mean, votes = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
        labels = torch.full((n, num_learners), -1, dtype=torch.long)
        for i in keep:
            mean[i], votes[i], labels[i] = vote(full[i, :, :int(used[i])])
        return PatchPredictions(self.names, mean, votes, labels, centres.cpu(), rejected,
                                full if return_patch_probs else None, used=used)

    def _forward_adaptive(self, images, masks, centres, keep, full, used):
        """Rounds of patches for the images whose label is not yet `settled`."""
        active = list(keep)
        start = 0
        while active and start < self.k:
            stop = min(self.k, max(start + self.adaptive_round, self.adaptive_min if start == 0 else 0))
            probs = self._forward_scales(images[active], masks[active], centres[active, start:stop].contiguous())
            full[active, :, start:stop] = probs.reshape(len(self.models), len(active), stop - start, -1
                                                        ).transpose(0, 1).cpu()
            used[active] = stop
            active = [i for i in active if not settled(full[i, :, :stop], self.k, self.adaptive_z)]
            start = stop
        return full, used


def predict_probs(engine: PatchEngine, rows: list[dict], chunk: int = 32, progress: bool = True) -> torch.Tensor:
    """``(N, L, C)`` mean softmax for ``rows`` (read from their packs a chunk at a time)."""
    out, handles = [], {}
    for start in tqdm(range(0, len(rows), chunk), desc="predicting", disable=not progress, leave=False):
        data = load_masked_set(rows[start:start + chunk], progress=False, handles=handles)
        result = engine.predict(data.images, data.masks)
        if any(result.rejected):
            log.warning("%d films rejected: %s", sum(r is not None for r in result.rejected),
                        [r for r in result.rejected if r][:3])
        out.append(result.probs)
    return torch.cat(out)
