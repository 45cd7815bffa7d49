"""The batched, seeded augmentations of patchflannel.training.augment."""
import pytest
import torch

from patchflannel.training.augment import Augmentation, elastic_distortion, gaussian_blur, perspective_warp


@pytest.fixture(scope="module")
def lungs():
    """Smooth 'lung' blobs on a zero background, in [0, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    blob = ((xs + 0.4) ** 2 / 0.1 + ys ** 2 / 0.5 < 1).float() * (0.5 + 0.3 * torch.sin(5 * ys))
    return torch.stack([blob.roll(i, -1) for i in range(6)])[:, None]


def test_sets_parse_and_compose():
    assert Augmentation.parse("standard") == Augmentation()
    combined = Augmentation.parse("strong+elastic+flip")
    assert combined.warp == 0.4 and combined.elastic > 0 and combined.flip == 0.5 and combined.zoom == (1.0, 1.3)
    assert Augmentation.parse("blur").rotation == 10.0  # a modifier alone applies on top of standard
    with pytest.raises(ValueError, match="unknown augmentation"):
        Augmentation.parse("standard+mixup")


def test_seeded_per_sample_and_background_kept(lungs):
    aug = Augmentation.parse("strong+elastic+blur")
    a = aug(lungs, torch.Generator().manual_seed(1), keep_zero=True)
    b = aug(lungs, torch.Generator().manual_seed(1), keep_zero=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(lungs, torch.Generator().manual_seed(2), keep_zero=True))
    # the same film in every slot still gets a different warp per slot
    same = lungs[:1].expand(6, -1, -1, -1).contiguous()
    out = Augmentation.parse("standard")(same, torch.Generator().manual_seed(0))
    assert len({round(float(o.sum()), 3) for o in out}) == 6
    assert out.min() >= 0 and out.max() <= 1
    augmented = Augmentation.parse("standard+rot5")(lungs, torch.Generator().manual_seed(0), keep_zero=True)
    assert torch.equal(Augmentation.parse("none")(lungs, torch.Generator()), lungs)  # the identity
    background = augmented == 0
    assert background.float().mean() > 0.3  # the zero background stays exactly zero


def test_flip_blur_warp_elastic(lungs):
    flipped = Augmentation(rotation=0, zoom=(1, 1), lighting=None, flip=1.0)(lungs, torch.Generator())
    assert torch.equal(flipped, lungs.flip(-1))
    flat = torch.full((3, 1, 16, 16), 0.4)
    assert torch.allclose(gaussian_blur(flat, torch.Generator(), 1.0), flat)  # normalised kernel
    blurred = gaussian_blur(lungs, torch.Generator().manual_seed(0), 1.0)
    assert (blurred[:, :, 1:] - blurred[:, :, :-1]).abs().sum() < (lungs[:, :, 1:] - lungs[:, :, :-1]).abs().sum()
    assert torch.allclose(perspective_warp(lungs, torch.Generator(), 0.0), lungs, atol=1e-5)
    assert torch.allclose(elastic_distortion(lungs, torch.Generator(), 0.0), lungs, atol=1e-5)
    warped = perspective_warp(lungs, torch.Generator().manual_seed(0), 0.4)
    assert (warped - lungs).abs().mean() > 0.01


def test_crops_zoom_in():
    ramp = torch.linspace(0, 1, 65)[None, None, None].expand(2, 1, 65, 65).contiguous()
    centre = Augmentation(rotation=0, zoom=(1, 1), lighting=None, crop=0.5)(ramp, torch.Generator())
    assert centre[0, 0, 0, 0] == pytest.approx(0.25, abs=0.02)  # the middle half fills the frame
    assert centre[0, 0, 0, -1] == pytest.approx(0.75, abs=0.02)
