"""The shipped ``lite`` learner set and pipeline: integrity, split, behaviour on held-out patients."""
import numpy as np
import pytest

from patchflannel.evaluation.splits import read_split
from patchflannel.labels import CLASSES
from patchflannel.learners import PRESETS
from patchflannel.hub import default_bundle
from patchflannel.learners.bundle import load_learner_set

DEFAULT_LEARNERS = default_bundle("learners")


@pytest.fixture(scope="module")
def shipped():
    if not DEFAULT_LEARNERS.is_dir():
        pytest.fail(f"shipped learners missing at {DEFAULT_LEARNERS}")
    return load_learner_set()


def test_shipped_set_is_the_lite_preset(shipped):
    learners, shared = shipped
    assert list(learners) == list(PRESETS["lite"])
    assert shared["classes"] == list(CLASSES) and shared["patch_size"] == 224


def test_split_covers_every_patient_and_keeps_other_pneumonia_out_of_training(data_dir):
    from patchflannel.manifest import read_manifest

    split = read_split(DEFAULT_LEARNERS / "split.csv")
    rows = read_manifest(data_dir / "cxr4" / "manifest.csv") + read_manifest(data_dir / "adult" / "manifest.csv")
    assert {r["patient_id"] for r in rows} <= set(split)
    assert set(split.values()) == {"train", "val", "test"}


PER_CLASS, HELD_OUT_K = 10, 4


@pytest.fixture(scope="module")
def held_out(cxr4_rows):
    """Ten held-out cxr4 films per class (chance: 0.25), classified by the shipped pipeline."""
    from patchflannel import Pipeline

    split = read_split(DEFAULT_LEARNERS / "split.csv")
    picked = []
    for label in CLASSES:
        rows = [r for r in cxr4_rows if r["label"] == label and split[r["patient_id"]] == "test"]
        picked += rows[:: max(1, len(rows) // PER_CLASS)][:PER_CLASS]
    preds = Pipeline.from_pretrained(device="cpu", k=HELD_OUT_K).predict([r["image"] for r in picked])
    assert all(p.ok for p in preds), [p.rejection for p in preds if not p.ok]
    return picked, preds


# Measured on these 40 films (K = 4, float32): lite0 0.675, lite1 0.525, lite2 0.50, FLANNEL
# 0.65 (the model card's 267 held-out films, class-balanced, K = 16: 0.76, 0.77, 0.71, 0.76).
# The floors leave six films (lite0-2) and eight (FLANNEL) to flip on another CPU's kernels
# before failing, yet stay above chance (0.25). The two random-init learners (0.525, 0.675
# here) are not floored: they are near enough to chance on the model card that no floor would
# be both safe and meaningful. Votes over 4 patches are coarse, so learners are scored by their
# mean patch probabilities (what the ensemble consumes).
FLOORS = {"efficientnet_lite0": 0.35, "efficientnet_lite1": 0.35, "efficientnet_lite2": 0.35, "FLANNEL": 0.45}


@pytest.mark.slow
def test_held_out_films_are_classified_above_chance(held_out):
    picked, preds = held_out
    truth = [r["label"] for r in picked]
    top = lambda probs: max(probs, key=probs.get)  # noqa: E731
    accuracy = {name: np.mean([top(p.learners[name]["probabilities"]) == t for p, t in zip(preds, truth)])
                for name in FLOORS if name != "FLANNEL"}
    accuracy["FLANNEL"] = np.mean([p.label == t for p, t in zip(preds, truth)])
    assert all(accuracy[n] >= FLOORS[n] for n in FLOORS), accuracy


@pytest.mark.slow
def test_shipped_pipeline_combines_the_learners_with_flannel(held_out):
    _, preds = held_out
    assert all(p.combiner == "FLANNEL ensemble" for p in preds)
    weights = np.array([list(p.learner_weights.values()) for p in preds])
    assert np.isfinite(weights).all() and (np.abs(weights) <= 1).all()
    probs = np.array([list(p.probabilities.values()) for p in preds])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
