"""The input gate: lung-mask measures, each refusal reason, real films in and non-films out."""

import cv2
import numpy as np
import pytest

from patchflannel.evaluation.non_cxr import non_cxr_images
from patchflannel.io import as_grey_float, load_image
from patchflannel.segment import LungCheck, lung_features



def _two_lungs(size=160, sure=True) -> np.ndarray:
    p = np.zeros((size, size), np.float32)
    cv2.ellipse(p, (50, 80), (25, 55), 0, 0, 360, 1.0, -1)
    cv2.ellipse(p, (110, 80), (25, 55), 0, 0, 360, 1.0, -1)
    return p if sure else p * 0.6


def test_features_of_a_pair_of_lungs():
    f = lung_features(_two_lungs())
    assert f["n_components"] == 2 and f["second_ratio"] == pytest.approx(1, abs=0.02)
    assert f["left_x"] == pytest.approx(50 / 160, abs=0.01) and f["right_x"] == pytest.approx(110 / 160, abs=0.01)
    assert f["height_overlap"] == 1 and f["undecided"] == 0 and f["area"] == pytest.approx(2 * np.pi * 25 * 55 / 160**2, rel=0.05)
    assert LungCheck().reason(_two_lungs()) is None
    assert "unsure" in LungCheck().reason(_two_lungs(sure=False))


def test_each_check_names_its_reason():
    ok = lung_features(_two_lungs())
    check = LungCheck()
    cases = {
        "no plausible lungs": {"area": 0.01},
        "maximum 85%": {"area": 0.9},
        "not two lungs": {"second_ratio": 0.02},
        "both sides of the midline": {"left_x": 0.6},
        "not side by side": {"height_overlap": 0.1},
        "of the way down": {"bottom_y": 0.4},
        "separate regions": {"n_components": 12},
        "of the image undecided": {"undecided_image": 0.3},
        "of the lung mask undecided": {"undecided": 0.5},
    }
    for words, change in cases.items():
        assert words in check.judge({**ok, **change}), words
    assert check.judge(ok) is None
    assert LungCheck(min_second_ratio=0).judge({**ok, "second_ratio": 0.0}) is None  # the check switched off


def test_real_films_of_every_source_pass(segmenter, data_dir):
    from patchflannel.manifest import read_manifest

    for part in ("lungseg", "cxr4", "adult"):
        rows = read_manifest(data_dir / part / "manifest.csv")
        by_source = {}
        for r in rows:
            by_source.setdefault(r["source"], []).append(r["image"])
        films = [p for paths in by_source.values() for p in paths[:: max(1, len(paths) // 3)][:3]]
        for result, path in zip(segmenter.segment_batch([load_image(p) for p in films], original_mask=False), films):
            assert result.ok, (path, result.rejection)


def test_non_cxr_images_are_refused(segmenter):
    images = non_cxr_images()
    picked = ["skimage.camera", "skimage.page", "skimage.brick", "matplotlib.brain_mri", "skimage.lfw_face0",
              "generated.uniform_noise", "generated.horizontal_gradient", "generated.text", "generated.black"]
    results = segmenter.segment_batch([as_grey_float(images[n]) for n in picked], original_mask=False)
    for name, result in zip(picked, results):
        assert not result.ok and result.rejection, name
