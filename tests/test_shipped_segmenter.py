import json

import numpy as np
import pytest

from patchflannel.evaluation.splits import read_split
from patchflannel.errors import WeightsError
from patchflannel.io import load_image, load_mask
from patchflannel.segment import Segmenter
from patchflannel.evaluation.metrics import jaccard_dice

from .conftest import SHIPPED_SEGMENTER


@pytest.fixture(scope="module")
def held_out(lungseg_rows):
    split = read_split(SHIPPED_SEGMENTER / "split.csv")
    rows = [r for r in lungseg_rows if split[r["patient_id"]] == "test" and r["source"] != "gbseg"]
    return rows[:: max(1, len(rows) // 8)][:8]


def test_split_covers_every_patient_once(lungseg_rows):
    split = read_split(SHIPPED_SEGMENTER / "split.csv")
    assert set(split) == {r["patient_id"] for r in lungseg_rows}
    assert set(split.values()) == {"train", "val", "test"}


def test_shipped_weights_on_held_out_patients(segmenter, held_out):
    images = [load_image(r["image"]) for r in held_out]
    results = segmenter.segment_batch(images)
    dice = []
    for row, image, res in zip(held_out, images, results):
        assert res.mask.shape == image.shape and res.ok
        assert res.working_mask.shape == (1024, 1024)
        dice.append(jaccard_dice(res.mask, load_mask(row["mask"]))[1])
    assert np.mean(dice) > 0.9 and min(dice) > 0.8


def test_same_input_same_mask(segmenter, held_out):
    image = load_image(held_out[0]["image"])
    a, b = segmenter.segment(image), segmenter.segment(image)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_blank_image_is_rejected_not_segmented(segmenter):
    result = segmenter.segment(np.zeros((300, 300), np.float32))
    assert not result.ok and "lung" in result.rejection


def test_corrupt_weights_are_refused(tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((SHIPPED_SEGMENTER / name).read_bytes())
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        Segmenter.from_bundle(tmp_path)
    with pytest.raises(WeightsError, match="not found"):
        Segmenter.from_bundle(tmp_path / "missing")


def test_config_records_preprocessing_and_training(segmenter):
    config = json.loads((SHIPPED_SEGMENTER / "config.json").read_text())
    assert config["preprocess"] == segmenter.preprocess.to_dict()
    assert config["architecture"]["type"] == "fcdensenet"
    assert 0 < config["threshold"] < 1


def test_arrays_are_validated_and_rescaled(segmenter, held_out):
    from patchflannel.errors import InvalidImageError

    image = load_image(held_out[0]["image"])
    reference = segmenter.segment(image).mask
    # A 12-bit film passed as float32 0..4095 is rescaled, not clipped to white.
    assert jaccard_dice(segmenter.segment((image * 4095).astype(np.float32)).mask, reference)[0] > 0.98
    bad = image.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidImageError, match="NaN"):
        segmenter.segment(bad)


def test_every_shipped_segmenter_holds_out_the_same_patients_and_segments_them(held_out):
    # The bundles are compared on one held-out set, so they must share one split.
    weights = SHIPPED_SEGMENTER.parent
    bundles = sorted(p for p in weights.glob("segmenter-*") if (p / "config.json").is_file())
    assert len(bundles) >= 3
    for bundle in bundles:
        assert (bundle / "split.csv").read_text() == (SHIPPED_SEGMENTER / "split.csv").read_text(), bundle
    big = Segmenter.from_bundle(weights / "segmenter-fcdensenet103", device="cpu")
    assert big.preprocess.size == 320
    images = [load_image(r["image"]) for r in held_out[:2]]
    for row, res in zip(held_out, big.segment_batch(images)):
        assert jaccard_dice(res.mask, load_mask(row["mask"]))[1] > 0.9
