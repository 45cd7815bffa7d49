"""Stage 2 patch sampling: lung-centred centres and batched, zero-padded crops.

Centres are uniform over the lung pixels of each mask (row and column drawn jointly, never
independently), so every centre lies inside the lung. They are drawn as a seeded stream of
uniform candidate points over the whole grid, each accepted where the mask is lung: the
stream depends only on the seed and the grid size, never on the mask, so a mask pixel
decided differently (bf16 vs float32, CPU vs GPU) can only add or remove the candidates
that land on it; every other centre stays where it was. Crops are cut from tensors already
in memory for a whole batch at once by index arithmetic, zero-padded where they cross the
image border and never stretched.

Examples:
    >>> import torch
    >>> from patchflannel.patches import sample_centres, extract_patches
    >>> mask = torch.zeros(64, 64, dtype=torch.bool); mask[20:40, 10:30] = True
    >>> centres = sample_centres(mask, 5, generator=torch.Generator().manual_seed(0))
    >>> bool(mask[centres[:, 0], centres[:, 1]].all())
    True
    >>> extract_patches(torch.rand(1, 1, 64, 64), centres[None], 16).shape
    torch.Size([5, 1, 16, 16])
"""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import torch

from .errors import PatchflannelError

__all__ = ["CANDIDATES_PER_ROUND", "DEFAULT_K", "EmptyMaskError", "extract_patches", "image_seed",
           "rescale_centres", "rescale_film",
           "sample_centres"]


class EmptyMaskError(PatchflannelError):
    """A mask with too few lung pixels to centre patches on."""


def image_seed(image: np.ndarray | torch.Tensor, seed: int = 0) -> int:
    """A seed derived from an image's content and ``seed``: the same input always draws the
    same patches, wherever it sits in a batch. Pass the decoded input (not the masked film),
    so the seed does not depend on the segmentation."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    digest = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


#: Patches per film when nothing says otherwise: the method's K (a pipeline bundle records its own).
DEFAULT_K = 100

#: Candidate points drawn per round: the stream is the same whatever the mask, because every
#: round draws this many whether or not they are needed.
CANDIDATES_PER_ROUND = 1024


def sample_centres(mask: torch.Tensor | np.ndarray, k: int, *, generator: torch.Generator,
                   min_pixels: int = 100) -> torch.Tensor:
    """``k`` patch centres ``(k, 2)`` as (row, col), uniform over the mask's lung pixels (with replacement).

    The centres are the first ``k`` points of a seeded stream of uniform candidates over the
    mask's grid that fall on lung (rejection sampling): the stream depends only on
    ``generator``'s state and the grid size, so changing one mask pixel moves only the
    centres that landed on it.

    Raises:
        EmptyMaskError: fewer than ``min_pixels`` lung pixels.
    """
    mask = torch.as_tensor(mask).bool()
    lung = int(mask.sum())
    if lung < max(1, min_pixels):
        raise EmptyMaskError(f"lung mask has {lung} pixels, fewer than {min_pixels}: no patches can be centred")
    flat = mask.reshape(-1).cpu()
    height, width = mask.shape
    accepted: list[torch.Tensor] = []
    found = 0
    # min_pixels bounds the expected number of rounds: k * H * W / (lung * CANDIDATES_PER_ROUND).
    while found < k:
        candidates = torch.randint(height * width, (CANDIDATES_PER_ROUND,), generator=generator)
        hits = candidates[flat[candidates]]
        accepted.append(hits)
        found += len(hits)
    index = torch.cat(accepted)[:k]
    centres = torch.stack([index // width, index % width], dim=1)
    return centres.to(mask.device)


def extract_patches(images: torch.Tensor, centres: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Crops of ``size`` px centred on ``centres`` for every image, in one indexing operation.

    Args:
        images: ``(N, C, H, W)`` on any device.
        centres: ``(N, K, 2)`` integer (row, col) per image.
        size: patch side.

    Returns:
        ``(N * K, C, size, size)``, image-major (all K patches of image 0 first), zero
        outside the image.
    """
    n, c = images.shape[:2]
    k = centres.shape[1]
    half = size // 2
    padded = torch.nn.functional.pad(images, (half, size - half, half, size - half))
    offsets = torch.arange(size, device=images.device)
    centres = centres.to(images.device)
    rows = (centres[..., 0, None] + offsets).reshape(n, k, size, 1)  # top row in padded coords = centre - half + half
    cols = (centres[..., 1, None] + offsets).reshape(n, k, 1, size)
    batch = torch.arange(n, device=images.device).reshape(n, 1, 1, 1)
    patches = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (N, K, size, size, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(n * k, c, size, size)


def rescale_film(image: np.ndarray, mask: np.ndarray, size: int, *,
                 keep_outside: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A film ``(H, W)`` uint8 and its bool lung mask letterboxed to ``size`` px: the film
    resampled (area-averaged when shrinking), the mask by nearest neighbour, and the film
    masked again (resampling smears lung pixels across the mask's edge) unless
    ``keep_outside``. What a learner whose ``working_size`` is ``size`` was trained on, and what
    the engine feeds it."""
    from .preprocess import Letterbox

    box = Letterbox(image.shape, size)
    small_mask = box.apply(mask.astype(np.uint8), interpolation=cv2.INTER_NEAREST).astype(bool)
    small = box.apply(image)
    return (small if keep_outside else np.where(small_mask, small, 0).astype(np.uint8)), small_mask


def rescale_centres(centres: torch.Tensor, from_size: int, to_size: int) -> torch.Tensor:
    """Patch centres on a ``from_size`` grid moved to the same places of a ``to_size`` grid."""
    if from_size == to_size:
        return centres
    return torch.clamp((centres.float() + 0.5) * to_size / from_size, max=to_size - 1).long()
