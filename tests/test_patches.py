import numpy as np
import pytest
import torch

from patchflannel.patches import (
    EmptyMaskError,
    extract_patches,
    image_seed,
    sample_centres,
)


@pytest.fixture(scope="module")
def real_mask_and_image(lungseg_rows):
    from patchflannel.io import load_image, load_mask

    row = lungseg_rows[10]
    return torch.from_numpy(load_mask(row["mask"])), torch.from_numpy(load_image(row["image"]))


def test_every_centre_inside_the_lung(real_mask_and_image):
    mask, _ = real_mask_and_image
    centres = sample_centres(mask, 500, generator=torch.Generator().manual_seed(0))
    assert centres.shape == (500, 2)
    assert mask[centres[:, 0], centres[:, 1]].all()


def test_centres_cover_the_lung_uniformly(real_mask_and_image):
    mask, _ = real_mask_and_image
    centres = sample_centres(mask, 20000, generator=torch.Generator().manual_seed(1))
    # The two lungs get centres in proportion to their areas (joint draw over pixels).
    left = mask[:, : mask.shape[1] // 2].sum() / mask.sum()
    drawn_left = (centres[:, 1] < mask.shape[1] // 2).float().mean()
    assert abs(float(drawn_left) - float(left)) < 0.02


def test_seeds_reproduce(real_mask_and_image):
    mask, image = real_mask_and_image
    a = sample_centres(mask, 50, generator=torch.Generator().manual_seed(image_seed(image)))
    b = sample_centres(mask, 50, generator=torch.Generator().manual_seed(image_seed(image)))
    c = sample_centres(mask, 50, generator=torch.Generator().manual_seed(image_seed(image, seed=1)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert image_seed(image) == image_seed(image.numpy())


def test_empty_mask_is_refused():
    with pytest.raises(EmptyMaskError, match="fewer than"):
        sample_centres(torch.zeros(64, 64, dtype=torch.bool), 5, generator=torch.Generator())


def naive_crop(image: np.ndarray, r: int, c: int, size: int) -> np.ndarray:
    out = np.zeros((image.shape[0], size, size), image.dtype)
    half = size // 2
    for i in range(size):
        for j in range(size):
            y, x = r - half + i, c - half + j
            if 0 <= y < image.shape[1] and 0 <= x < image.shape[2]:
                out[:, i, j] = image[:, y, x]
    return out


def test_extraction_equals_naive_crops_with_zero_padding(real_mask_and_image):
    mask, image = real_mask_and_image
    images = torch.stack([image, image.flip(0)])[:, None].repeat(1, 2, 1, 1)  # N=2, C=2
    gen = torch.Generator().manual_seed(3)
    centres = torch.stack([sample_centres(mask, 4, generator=gen) for _ in range(2)])
    centres[0, 0] = torch.tensor([0, 0])  # corner: 3/4 of the patch is padding
    centres[1, 1] = torch.tensor([image.shape[0] - 1, image.shape[1] - 1])
    patches = extract_patches(images, centres, 32)
    assert patches.shape == (8, 2, 32, 32)
    for n in range(2):
        for k in range(4):
            r, c = centres[n, k].tolist()
            np.testing.assert_array_equal(patches[n * 4 + k].numpy(), naive_crop(images[n].numpy(), r, c, 32))
    assert patches[0, :, :16, :].abs().sum() == 0  # rows above the image are zero, not stretched


def test_a_mask_pixel_decided_differently_moves_only_the_centres_on_it(real_mask_and_image):
    """The centres of two masks that differ in border pixels (another precision, device or CPU)
    are the same points but for those landing on the changed pixels."""
    from collections import Counter

    mask, _ = real_mask_and_image
    k = 100

    def centres(m):
        return Counter(map(tuple, sample_centres(m, k, generator=torch.Generator().manual_seed(3)).tolist()))

    before = centres(mask)
    # Flip a whole border: every lung pixel with a background neighbour, one pixel wide.
    inner = mask.clone()
    inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    border = mask & ~inner
    assert border.sum() > 100
    after = centres(inner)
    on_border = sum(n for (r, c), n in before.items() if border[r, c])
    shared = sum((before & after).values())
    assert shared == k - on_border  # every centre off the changed pixels stays
    assert on_border < 0.1 * k


def test_settled_waits_for_evidence_and_always_stops_at_k():
    from patchflannel.learners.engine import settled

    generator = torch.Generator().manual_seed(0)
    sure = torch.tensor([0.9, 0.05, 0.03, 0.02]).expand(2, 16, 4)  # 2 learners, 16 identical patches
    assert settled(sure, k=100)
    split = torch.softmax(torch.randn(2, 16, 4, generator=generator) * 3, -1)  # patches that disagree
    assert not settled(split, k=100)
    assert settled(split, k=16)  # all K seen: nothing left to change the label
    assert not settled(sure[:, :1], k=100)  # one patch is no evidence
