import numpy as np
import pytest

from patchflannel.io import load_image
from patchflannel.preprocess import (
    Letterbox,
    SegmenterPreprocess,
    adjust_gamma,
    equalize_histogram,
    resize,
)


@pytest.fixture(scope="module")
def film(real_png):
    return load_image(real_png)


def test_equalisation_flattens_the_histogram(film):
    eq = equalize_histogram(film)
    assert eq.dtype == np.float32 and eq.shape == film.shape
    assert eq.min() == 0.0 and eq.max() == 1.0
    # Equalised intensities are close to uniform: each decile holds ~10% of the pixels.
    deciles = np.histogram(eq, bins=10, range=(0, 1))[0] / eq.size
    assert np.abs(deciles - 0.1).max() < 0.04
    # Monotone: brighter input pixels never become darker than dimmer ones.
    order = np.argsort(film.ravel(), kind="stable")
    assert np.all(np.diff(eq.ravel()[order]) >= 0)


def test_equalisation_of_constant_image_is_zero():
    assert not equalize_histogram(np.full((8, 8), 0.3, np.float32)).any()


def test_gamma_half_is_square_root(film):
    np.testing.assert_allclose(adjust_gamma(film, 0.5), np.sqrt(film), rtol=1e-6)


def test_resize_shapes_and_range(film):
    small = resize(film, (100, 80))
    assert small.shape == (100, 80)
    assert film.min() <= small.min() and small.max() <= film.max() + 1e-6


def test_segmenter_preprocess_is_deterministic_and_normalised(film):
    pre = SegmenterPreprocess(size=128)
    a, b = pre(film), pre(film)
    assert a.shape == (128, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # Equalised + gamma 0.5 has mean ~ 2/3 before normalisation ((x**0.5) over uniform x).
    assert abs(float(a.mean()) * pre.std + pre.mean - 2 / 3) < 0.05
    assert SegmenterPreprocess.from_dict(pre.to_dict()) == pre


def test_equalisation_uses_full_resolution(film):
    # Equalising before resizing differs from equalising the small image: the order is part of the recipe.
    pre = SegmenterPreprocess(size=64, gamma=1.0, mean=0.0, std=1.0)
    full_first = pre(film)
    small_first = equalize_histogram(resize(film, (64, 64)))
    assert np.abs(full_first - small_first).max() > 1e-3


@pytest.mark.parametrize("shape", [(512, 400), (300, 512), (512, 512)])
def test_letterbox_keeps_aspect_and_centres(shape):
    box = Letterbox(shape, 1024)
    ch, cw = box.content_shape
    assert max(ch, cw) == 1024
    assert abs(ch / cw - shape[0] / shape[1]) < 0.01
    image = np.ones(shape, np.uint8)
    out = box.apply(image)
    y, x = box.offset
    assert out.shape == (1024, 1024) and out.sum() == ch * cw
    assert out[y, x] == 1 and out[y + ch - 1, x + cw - 1] == 1
