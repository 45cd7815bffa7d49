import numpy as np
from scipy import ndimage

from patchflannel.io import load_mask
from patchflannel.segment import keep_largest_components, postprocess_mask
from patchflannel.evaluation.metrics import jaccard_dice


def test_cleans_specks_and_holes_on_real_mask(lungseg_rows):
    truth = load_mask(lungseg_rows[5]["mask"])
    noisy = truth.astype(np.float32)
    rng = np.random.default_rng(0)
    outside = np.argwhere(~ndimage.binary_dilation(truth, iterations=10))
    for y, x in outside[rng.choice(len(outside), 20, replace=False)]:
        noisy[y : y + 4, x : x + 4] = 0.9  # false-positive specks
    ys, xs = np.nonzero(ndimage.binary_erosion(truth, iterations=15))
    noisy[ys[0] : ys[0] + 6, xs[0] : xs[0] + 6] = 0.1  # a hole inside a lung
    cleaned = postprocess_mask(noisy, 0.5)
    assert ndimage.label(cleaned)[1] <= 2
    assert ndimage.label(~cleaned)[1] == 1  # no holes
    assert jaccard_dice(cleaned, truth)[0] > 0.99


def test_keeps_the_two_largest():
    mask = np.zeros((40, 40), bool)
    mask[1:20, 1:10] = True  # 171
    mask[1:20, 20:35] = True  # 285
    mask[30:33, 30:33] = True  # 9
    kept = keep_largest_components(mask)
    assert kept.sum() == 171 + 285 and not kept[31, 31]


def test_jaccard_dice_values():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert jaccard_dice(a, b) == (4 / 12, 8 / 16)
    assert jaccard_dice(a & False, b & False) == (1.0, 1.0)
