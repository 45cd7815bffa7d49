"""Batched, seeded training augmentations for grey CXR tensors ``(N, 1, H, W)`` in [0, 1].

Every random draw comes from an explicit ``torch.Generator`` and is made per sample, so a
batch of patches gets as many different warps as it has patches. (torchvision's v2 transforms
draw one parameter set per call for a whole batch, from the global generator; albumentations
works on one numpy image at a time. Both would mean a Python loop over the patches of every
step, so these few operations are written here on ``grid_sample`` and ``conv2d``.)

An `Augmentation` composes them in a fixed order: rotation/zoom/crop (one affine warp),
perspective warp, elastic distortion, horizontal flip, lighting, Gaussian blur. Named sets
(`AUGMENTATIONS`) combine with ``+``: ``Augmentation.parse("standard+elastic+flip")``.

>>> import torch
>>> aug = Augmentation.parse("strong")
>>> out = aug(torch.rand(4, 1, 64, 64), torch.Generator().manual_seed(0))
>>> tuple(out.shape)
(4, 1, 64, 64)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTATIONS", "Augmentation", "elastic_distortion", "gaussian_blur", "intensity_jitter",
           "perspective_warp", "random_affine"]


def _uniform(n: int, generator: torch.Generator):
    return lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)


def random_affine(tensors: list[torch.Tensor], generator: torch.Generator, *, max_rotation: float,
                  scale_range: tuple[float, float], max_translate: float = 0.0) -> list[torch.Tensor]:
    """One random rotation/zoom/shift per sample, the same warp applied to every ``(N, C, H, W)``
    tensor in ``tensors`` (e.g. images and their masks), bilinear, zero fill. No flips: lungs
    are not mirror-symmetric. ``max_translate`` is a fraction of the side."""
    n = tensors[0].shape[0]
    u = _uniform(n, generator)
    angle = torch.deg2rad(u(-max_rotation, max_rotation))
    scale = u(*scale_range)
    if max_translate:
        tx, ty = u(-max_translate, max_translate) * 2, u(-max_translate, max_translate) * 2
    else:
        tx = ty = torch.zeros(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, tensors[0].shape, align_corners=False)
    return [F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False) for t in tensors]


def intensity_jitter(images: torch.Tensor, generator: torch.Generator, *, gamma: float = 0.25,
                     contrast: tuple[float, float] = (0.9, 1.1), brightness: float = 0.05) -> torch.Tensor:
    """Random gamma (x exp(+-``gamma``)), contrast (a factor in the ``contrast`` range) and
    brightness (+-``brightness``) per sample; images in [0, 1]."""
    u = _uniform(images.shape[0], generator)
    g = torch.exp(u(-gamma, gamma))[:, None, None, None]
    c = u(*contrast)[:, None, None, None]
    b = u(-brightness, brightness)[:, None, None, None]
    return (images.clamp(0, 1) ** g * c + b).clamp(0, 1)


def perspective_warp(images: torch.Tensor, generator: torch.Generator, magnitude: float) -> torch.Tensor:
    """Move each corner by up to ``magnitude`` x half the side (fastai's ``max_warp``), per sample."""
    n = images.shape[0]
    src = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]).expand(n, 4, 2)
    dst = src + (torch.rand(n, 4, 2, generator=generator) * 2 - 1) * magnitude
    # The homography taking output coordinates (src) to input coordinates (dst): 8 unknowns.
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)
    h = torch.linalg.solve(a, torch.cat([u, v], 1))
    h = torch.cat([h, torch.ones(n, 1)], 1).view(n, 3, 3)
    height, width = images.shape[-2:]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3) @ h.transpose(1, 2)
    grid = (points[..., :2] / points[..., 2:].clamp_min(1e-6)).view(n, height, width, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def elastic_distortion(images: torch.Tensor, generator: torch.Generator, magnitude: float,
                       grid_cells: int = 4) -> torch.Tensor:
    """Smooth random displacements of up to ``magnitude`` x half the side: random offsets on a
    ``grid_cells`` x ``grid_cells`` grid, bicubically upsampled (a smooth field, as in Simard et al.)."""
    n, _, height, width = images.shape
    coarse = (torch.rand(n, 2, grid_cells + 1, grid_cells + 1, generator=generator) * 2 - 1) * magnitude
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    grid = torch.stack([xs, ys], -1)[None] + field.permute(0, 2, 3, 1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def gaussian_blur(images: torch.Tensor, generator: torch.Generator, probability: float,
                  sigma: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """A 3x3 Gaussian blur with a random sigma on a random ``probability`` share of the samples."""
    n = images.shape[0]
    s = _uniform(n, generator)(*sigma)
    chosen = torch.rand(n, generator=generator) < probability
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0])[None] / (2 * s[:, None] ** 2))
    taps = taps / taps.sum(1, keepdim=True)
    kernels = (taps[:, :, None] * taps[:, None, :])[:, None]  # (N, 1, 3, 3)
    blurred = F.conv2d(F.pad(images.transpose(0, 1), (1, 1, 1, 1), mode="replicate"), kernels,
                       groups=n).transpose(0, 1)
    return torch.where(chosen[:, None, None, None], blurred, images)


@dataclass(frozen=True)
class Augmentation:
    """What a training step does to its inputs (see the module docstring for the order).

    ``rotation`` (degrees), ``zoom`` (scale range; > 1 zooms in), ``translate`` (a random shift
    of up to this fraction of the side), ``crop`` (keep this fraction of the side: a centre
    crop, or a random one with ``random_crop``), ``warp`` (perspective
    magnitude), ``elastic`` (displacement magnitude), ``flip`` (probability of a horizontal
    flip: lungs are not mirror-symmetric, so opt-in), ``lighting`` (the contrast factor's
    range, with random gamma and ``brightness`` shifts; None: no intensity change), ``blur``
    (probability of a 3x3 Gaussian blur).
    """

    rotation: float = 10.0
    zoom: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.0
    crop: float = 1.0
    random_crop: bool = False
    warp: float = 0.0
    elastic: float = 0.0
    flip: float = 0.0
    lighting: tuple[float, float] | None = (0.9, 1.1)
    brightness: float = 0.05
    blur: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Augmentation:
        """``"standard"``, ``"none"``, ``"strong"``, ``"segmenter"`` or one of those followed by ``+``-joined
        modifiers of `AUGMENTATIONS` (``"standard+blur+flip"``)."""
        names = [s.strip() for s in spec.split("+") if s.strip()]
        unknown = [s for s in names if s not in AUGMENTATIONS]
        if not names or unknown:
            raise ValueError(f"unknown augmentation {unknown or spec!r}: combine {sorted(AUGMENTATIONS)} with '+'")
        bases = [n for n, a in AUGMENTATIONS.items() if isinstance(a, Augmentation)]
        aug = AUGMENTATIONS[names[0]] if names[0] in bases else AUGMENTATIONS["standard"]
        for name in names:
            if name not in bases:
                aug = replace(aug, **AUGMENTATIONS[name])
        return aug

    def __call__(self, images: torch.Tensor, generator: torch.Generator, *, keep_zero: bool = False) -> torch.Tensor:
        """Augment ``(N, 1, H, W)`` images in [0, 1]. ``keep_zero``: change intensities only where
        the input is non-zero (the masked-out background stays zero)."""
        return self.apply(images, generator, keep_zero=keep_zero)[0]

    def apply(self, images: torch.Tensor, generator: torch.Generator, *, masks: torch.Tensor | None = None,
              keep_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`__call__` that also moves ``masks`` ``(N, C, H, W)`` (e.g. lung masks, for the
        segmenter) with every geometric step, so they stay on their images; intensities change
        on the images only. Returns ``(images, masks)``."""
        x, m = images, masks
        scale = tuple(z / self.crop for z in self.zoom)
        translate = max(self.translate, (1 - self.crop) / 2 if self.random_crop else 0.0)
        if self.rotation or scale != (1.0, 1.0) or translate:
            moved = random_affine([x] if m is None else [x, m], generator, max_rotation=self.rotation,
                                  scale_range=scale, max_translate=translate)
            x, m = moved[0], (None if m is None else moved[1])
        for step, magnitude in ((perspective_warp, self.warp), (elastic_distortion, self.elastic)):
            if magnitude:
                both = step(x if m is None else torch.cat([x, m], 1), generator, magnitude)
                x, m = (both, None) if m is None else (both[:, :x.shape[1]], both[:, x.shape[1]:])
        if self.flip:
            flipped = torch.rand(x.shape[0], generator=generator)[:, None, None, None] < self.flip
            x = torch.where(flipped, x.flip(-1), x)
            m = None if m is None else torch.where(flipped, m.flip(-1), m)
        if self.lighting is not None:
            lit = intensity_jitter(x, generator, contrast=self.lighting, brightness=self.brightness)
            x = torch.where(x > 0, lit, torch.zeros_like(x)) if keep_zero else lit
        if self.blur:
            x = gaussian_blur(x, generator, self.blur)
        return x, m


#: Named sets and modifiers. ``standard`` is what the shipped learners trained with.
AUGMENTATIONS: dict = {
    "none": Augmentation(rotation=0.0, zoom=(1.0, 1.0), lighting=None),
    "standard": Augmentation(),
    # the fastai-style set of the transfer-learning studies: rotation 10, zoom 1.3, lighting, warp 0.4
    "strong": Augmentation(rotation=10.0, zoom=(1.0, 1.3), lighting=(1 / 1.4, 1.4), brightness=0.1, warp=0.4),
    # the segmenter's: small rotation, zoom and shift of film and mask together, intensity jitter
    "segmenter": Augmentation(rotation=10.0, zoom=(0.9, 1.1), translate=0.06),
    "rot5": {"rotation": 5.0},
    "rot10": {"rotation": 10.0},
    "rot15": {"rotation": 15.0},
    "zoom": {"zoom": (1.0, 1.3)},
    "lighting": {"lighting": (1 / 1.4, 1.4), "brightness": 0.1},  # fastai's max_lighting-style 1.4
    "warp": {"warp": 0.4},
    "elastic": {"elastic": 0.05},
    "blur": {"blur": 0.5},
    "centrecrop": {"crop": 0.875, "random_crop": False},
    "randomcrop": {"crop": 0.875, "random_crop": True},
    "flip": {"flip": 0.5},
}
