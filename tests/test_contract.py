"""The data contract travels with the weights: format version, working size, classes, fit K;
shipped bundles by name, from any working directory."""
import json
import shutil

import pytest

from patchflannel import Pipeline, WeightsError
from patchflannel.bundle import FORMAT_VERSION, read_config, rehash_bundle
from patchflannel.hub import SHIPPED, WEIGHTS_ENV, default_bundle, resolve_bundle, weights_dir


def _edit(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
    rehash_bundle(folder)


def test_every_shipped_bundle_carries_the_contract():
    for name, entry in SHIPPED.items():
        folder = weights_dir() / entry.folder
        if entry.kind == "pipeline":
            assert json.loads((folder / "pipeline.json").read_text())["format_version"] == FORMAT_VERSION
            continue
        configs = [read_config(p.parent) for p in sorted(folder.rglob("config.json"))]
        assert configs, name
        for config in configs:
            assert config["format_version"] == FORMAT_VERSION
            if entry.kind == "learners":
                assert config["working_size"] == 1024 and config["patch_size"] == 224 and config["classes"]
            if entry.kind == "ensemble":
                assert config["fit_k"] == config["fitted_on"]["k"]


def test_a_bundle_from_a_newer_format_is_refused(tmp_path):
    folder = tmp_path / "ensemble"
    shutil.copytree(default_bundle("ensemble"), folder)
    _edit(folder, format_version=FORMAT_VERSION + 1)
    with pytest.raises(WeightsError, match="newer than this library"):
        read_config(folder)


def test_the_learners_working_size_sets_the_segmenters_grid(tmp_path):
    learners = tmp_path / "learners"
    shutil.copytree(default_bundle("learners"), learners)
    for config in learners.glob("*/config.json"):
        _edit(config.parent, working_size=512)
    pipe = Pipeline.from_bundles(learners=learners, device="cpu", k=2)
    assert pipe.segmenter.working_size == 512 and pipe.engine.scales == [512] * 5


def test_a_saved_pipeline_keeps_the_weight_modules_record(tmp_path, default_pipeline):
    default_pipeline.save_pretrained(tmp_path / "copy")
    original = read_config(default_bundle("ensemble"))
    copied = read_config(tmp_path / "copy" / "ensemble")
    for key in ("fit_k", "fitted_on", "calibration", "training", "temperature", "learners", "classes"):
        assert copied[key] == original[key], key


def test_shipped_bundles_are_found_by_name_and_in_a_relocated_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository
    assert resolve_bundle("lite") == weights_dir() / "pipeline-lite"
    assert resolve_bundle("segmenter-unet-lite0") == weights_dir() / "segmenter-unet-lite0"
    moved = tmp_path / "bundles"
    shutil.copytree(weights_dir() / "ensemble-lite", moved / "ensemble-lite")
    monkeypatch.setenv(WEIGHTS_ENV, str(moved))
    assert resolve_bundle("ensemble-lite") == moved / "ensemble-lite"
    with pytest.raises(WeightsError, match=WEIGHTS_ENV):
        resolve_bundle("lite")  # not in the relocated folder: the message says where it looked


def test_pipeline_labels_come_from_the_bundle_and_are_checked(segmenter):
    from patchflannel.learners.bundle import load_learner_set

    models, shared = load_learner_set()
    with pytest.raises(WeightsError, match="predict"):
        Pipeline(segmenter, models, patch_size=shared["patch_size"], classes=["a", "b", "c", "d"], k=2)


def test_learners_at_two_scales_share_one_segmentation(tmp_path, pipeline, cxr4_rows):
    """Two of the five learners on the film at 512 px, three at 1024: one segmentation on the
    1024 grid, the same centres for all; the 1024 px learners predict exactly what they
    predict alone, and the set survives a save and reload."""
    learners = tmp_path / "learners"
    shutil.copytree(default_bundle("learners"), learners)
    for name in ("resnet18", "mobilenet_v3_small"):
        _edit(learners / name, working_size=512)
    pipe = Pipeline.from_bundles(learners=learners, device="cpu", k=pipeline.engine.k)
    assert pipe.segmenter.working_size == 1024
    assert dict(zip(pipe.learner_names, pipe.engine.scales)) == {
        "efficientnet_lite0": 1024, "efficientnet_lite1": 1024, "efficientnet_lite2": 1024,
        "resnet18": 512, "mobilenet_v3_small": 512}
    film = next(r["image"] for r in cxr4_rows if r["label"] == "normal")
    mixed, alone = pipe.predict(film, explain=True), pipeline.predict(film)
    assert mixed.ok and (mixed.centres == alone.centres).all()
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert mixed.learners[name] == alone.learners[name]
    assert all(mixed.learners[n]["probabilities"] != alone.learners[n]["probabilities"]
               for n in ("resnet18", "mobilenet_v3_small"))
    assert mixed.heatmap.shape == (256, 256) and set(mixed.learner_heatmaps) == set(pipe.learner_names)
    pipe.save_pretrained(tmp_path / "saved")
    again = Pipeline.from_pretrained(tmp_path / "saved", device="cpu", k=pipeline.engine.k).predict(film)
    assert again.to_dict() == mixed.to_dict()
