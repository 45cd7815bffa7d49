"""Bundles are verified end to end (config and weights), never reach for the network, and
resolve from any working directory."""
import hashlib
import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patchflannel.hub import resolve_bundle, weights_dir
from patchflannel.bundle import (
    UNVERIFIED_ENV,
    bundle_folders,
    config_digest,
    read_bundle,
    read_pipeline_spec,
    rehash_bundle,
    verify_bundle,
    write_bundle,
    write_pipeline_spec,
)
from patchflannel.ensemble.module import load_weight_module
from patchflannel.errors import WeightsError
from patchflannel.learners.bundle import load_learner, load_learner_set
from patchflannel.learners.registry import create_learner
from patchflannel.segment.bundle import load_bundle
from patchflannel.segment.model import build_segmentation_model
from patchflannel.segment.segmenter import Segmenter

LEARNER = "mobilenet_v3_small"  # the smallest shipped learner (3 MB)


class NetworkUsed(Exception):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly (and distinguishably)."""
    def connect(self, *args, **kwargs):
        raise NetworkUsed(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connect(None, *a))


@pytest.fixture(autouse=True)
def _verified_by_default(monkeypatch):
    monkeypatch.delenv(UNVERIFIED_ENV, raising=False)

WEIGHTS = weights_dir()


def _copy(tmp_path, name: str) -> Path:
    dest = tmp_path / Path(name).name
    shutil.copytree(WEIGHTS / name, dest)
    return dest


def _edit(folder: Path, change, *, rehash: bool = False) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2))
    if rehash:
        rehash_bundle(folder)


@pytest.fixture
def ensemble(tmp_path):
    return _copy(tmp_path, "ensemble-lite")


@pytest.fixture
def learner(tmp_path):
    return _copy(tmp_path, f"learners-lite/{LEARNER}")


@pytest.fixture
def seg(tmp_path):
    return _copy(tmp_path, "segmenter-fcdensenet-lite")


# --- every shipped bundle verifies ----------------------------------------------------------------------------


def test_every_shipped_bundle_records_and_passes_both_hashes():
    folders = bundle_folders()
    names = {f.relative_to(WEIGHTS).as_posix() for f in folders}
    assert {"ensemble-lite", "pipeline-lite", "segmenter-fcdensenet-lite", "segmenter-unet-lite0",
            f"learners-lite/{LEARNER}"} <= names
    for folder in folders:
        config = verify_bundle(folder)
        assert config["config_sha256"] == config_digest(config), folder
        if (folder / "config.json").is_file():
            assert len(config["weights_sha256"]) == 64, folder


def test_config_sha256_is_the_hash_of_the_canonical_json(ensemble):
    config = json.loads((ensemble / "config.json").read_text())
    rest = {k: v for k, v in config.items() if k != "config_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    assert config["config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert "weights_sha256" in rest  # one hash covers the whole bundle


def test_written_bundles_carry_both_hashes_and_load(tmp_path):
    module = torch.nn.Linear(3, 2)
    write_bundle(tmp_path / "b", module, {"task": "x", "weights_sha256": "stale", "config_sha256": "stale",
                                          "shape": (3, 2)})
    state, config = read_bundle(tmp_path / "b")
    assert config["weights_sha256"] != "stale" and config["config_sha256"] == config_digest(config)
    assert config["shape"] == [3, 2]
    torch.testing.assert_close(state["weight"], module.weight.detach(), rtol=0, atol=0)


def test_shipped_bundles_load_the_same_tensors(learner):
    model, config = load_learner(learner)
    raw = load_file(WEIGHTS / "learners-lite" / LEARNER / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(raw)
    for key, value in raw.items():
        assert torch.equal(state[key], value.float() if value.is_floating_point() else value), key


# --- edited or unverifiable bundles are refused ---------------------------------------------------------------


def test_an_edited_threshold_is_refused_naming_config_json(seg):
    _edit(seg, lambda c: c.update(threshold=0.999))
    with pytest.raises(WeightsError, match=r"config\.json.*config_sha256") as info:
        Segmenter.from_bundle(seg, device="cpu")
    assert str(seg / "config.json") in str(info.value) and "rehash_bundle" in str(info.value)


def test_an_edited_temperature_is_refused(ensemble):
    _edit(ensemble, lambda c: c.update(temperature=50.0))
    with pytest.raises(WeightsError, match=r"config\.json"):
        load_weight_module(ensemble)


def test_a_deleted_weights_hash_is_refused(learner):
    _edit(learner, lambda c: c.pop("weights_sha256"))
    with pytest.raises(WeightsError, match="config_sha256"):
        load_learner(learner)
    # Even with a matching config hash, weights nothing vouches for are refused.
    _edit(learner, lambda c: c.update(config_sha256=config_digest(c)))
    with pytest.raises(WeightsError, match="no weights_sha256"):
        load_learner(learner)


def test_a_deleted_config_hash_is_refused(ensemble, learner, seg):
    for folder, load in ((ensemble, load_weight_module), (learner, load_learner), (seg, load_bundle)):
        _edit(folder, lambda c: c.pop("config_sha256"))
        with pytest.raises(WeightsError, match=r"config\.json records no config_sha256"):
            load(folder)


def test_a_learner_set_with_one_edited_member_is_refused(tmp_path, learner):
    (tmp_path / "set").mkdir()
    shutil.move(learner, tmp_path / "set" / LEARNER)
    _edit(tmp_path / "set" / LEARNER, lambda c: c["normalization"].update(mean=0.0))
    with pytest.raises(WeightsError, match=LEARNER):
        load_learner_set(tmp_path / "set")


def test_opt_in_loads_an_edited_bundle_with_a_warning(ensemble, caplog):
    _edit(ensemble, lambda c: c.update(temperature=2.0))
    with caplog.at_level(logging.WARNING, logger="patchflannel.bundle"):
        module, config = load_weight_module(ensemble, verify=False)
    assert config["temperature"] == 2.0 and module.num_learners == 5
    assert any("UNVERIFIED" in r.message and "config.json" in r.message for r in caplog.records)


def test_environment_opt_in_for_command_line_tools(learner, monkeypatch, caplog):
    _edit(learner, lambda c: (c.pop("weights_sha256"), c.pop("config_sha256")))
    monkeypatch.setenv(UNVERIFIED_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="patchflannel.bundle"):
        learners, _ = load_learner_set(learner)
    assert list(learners) == [LEARNER]
    messages = " ".join(r.message for r in caplog.records)
    assert "no config_sha256" in messages and "no weights_sha256" in messages


def test_rehash_after_a_deliberate_edit(seg):
    _edit(seg, lambda c: c.update(threshold=0.6), rehash=True)
    model, config = load_bundle(seg)
    assert config["threshold"] == 0.6
    # rehash never blesses weights that changed behind the config's back...
    weights = seg / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="weights=True"):
        rehash_bundle(seg)
    # ...unless asked to.
    rehash_bundle(seg, weights=True)
    assert read_bundle(seg)[1]["weights_sha256"] == hashlib.sha256(bytes(data)).hexdigest()


def test_implausible_values_of_a_rehashed_bundle_are_refused(seg, ensemble):
    _edit(seg, lambda c: c.update(threshold=1.5), rehash=True)
    with pytest.raises(WeightsError, match="threshold"):
        load_bundle(seg)
    _edit(ensemble, lambda c: c.update(temperature=-1), rehash=True)
    with pytest.raises(WeightsError, match="temperature"):
        load_weight_module(ensemble)


# --- broken files fail naming the file ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"task": "patch-classification",', "[1, 2]", "", "\xff\xfe"])
def test_malformed_config_names_the_file(learner, text):
    (learner / "config.json").write_bytes(text.encode("latin-1"))
    for verify in (True, False):
        with pytest.raises(WeightsError, match=r"config\.json") as info:
            load_learner(learner, verify=verify)
        assert str(learner / "config.json") in str(info.value)


def test_missing_keys_name_the_file(learner):
    _edit(learner, lambda c: c.pop("learner"), rehash=True)
    with pytest.raises(WeightsError, match=r"config\.json lacks \['learner'\]"):
        load_learner(learner)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors_names_the_file(seg, damage):
    weights = seg / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:20] if damage == "truncate" else (2**60).to_bytes(8, "little") + data[8:])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*SHA-256"):
        load_bundle(seg)
    with pytest.raises(WeightsError, match=r"model\.safetensors is not a readable safetensors file"):
        load_bundle(seg, verify=False)


def test_missing_weights_file_names_the_bundle(seg):
    (seg / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"lacks model\.safetensors"):
        load_bundle(seg)


# --- nothing is downloaded ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm/hf-hub:x/y", "timm/hf_hub:x/y", "timm/local-dir:/tmp/x",
                                  "timm/https://example.com/m", "timm/timm/resnet18", "timm/no_such_model",
                                  "hf-hub:x/y", "fasterrcnn_resnet50_fpn", "fcn_resnet50", "quantized_resnet18"])
def test_create_learner_refuses_names_that_could_download(no_network, name):
    with pytest.raises(ValueError):
        create_learner(name)


@pytest.mark.parametrize("architecture", [
    {"type": "smp", "arch": "Unet", "encoder_name": "tu-hf-hub:x/y"},
    {"type": "smp", "arch": "Unet", "encoder_name": "tu-hf_hub:x/y"},
    {"type": "smp", "arch": "Unet", "encoder_name": "hf-hub:x/y"},
    {"type": "smp", "arch": "Unet", "encoder_name": "tu-no_such_model"},
    {"type": "smp", "arch": "Unet", "encoder_name": "resnet18", "kwargs": {"encoder_weights": "imagenet"}},
])
def test_smp_encoders_that_could_download_are_refused(no_network, architecture):
    with pytest.raises(ValueError):
        build_segmentation_model(architecture)


def test_a_learner_bundle_naming_a_hub_model_is_refused_by_the_name_check(learner, no_network):
    _edit(learner, lambda c: c.update(learner="timm/hf-hub:x/y"), rehash=True)  # hashes valid: a crafted bundle
    with pytest.raises(WeightsError, match=r"config\.json.*hub") as info:
        load_learner(learner)
    assert isinstance(info.value.__cause__, ValueError)
    assert not isinstance(info.value.__context__, NetworkUsed)


def test_a_segmenter_bundle_naming_a_hub_encoder_is_refused_by_the_name_check(seg, no_network):
    _edit(seg, lambda c: c.update(architecture={"type": "smp", "arch": "Unet", "encoder_name": "tu-hf-hub:x/y"}),
          rehash=True)
    with pytest.raises(WeightsError, match=r"config\.json.*hub") as info:
        Segmenter.from_bundle(seg, device="cpu")
    assert isinstance(info.value.__cause__, ValueError)


def test_shipped_timm_and_smp_bundles_load_without_network(no_network):
    model, config = load_learner("weights/learners-lite/efficientnet_lite0")  # timm
    assert config["learner"] == "efficientnet_lite0"
    _, seg_config = load_bundle("segmenter-unet-lite0")  # smp, tu- encoder
    assert seg_config["architecture"]["encoder_name"] == "tu-efficientnet_lite0"


# --- paths ----------------------------------------------------------------------------------------------------


def test_shipped_bundles_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_bundle("weights/segmenter-unet-lite0") == WEIGHTS / "segmenter-unet-lite0"
    assert resolve_bundle("ensemble-lite") == WEIGHTS / "ensemble-lite"
    assert resolve_bundle(Path("weights") / "learners-lite" / LEARNER) == WEIGHTS / "learners-lite" / LEARNER
    assert Segmenter.from_bundle("weights/segmenter-fcdensenet-lite", device="cpu").name == "segmenter-fcdensenet-lite"
    module, _ = load_weight_module("weights/ensemble-lite")
    assert module.num_learners == 5
    assert read_pipeline_spec("weights/pipeline-lite")["k"] == 100
    with pytest.raises(WeightsError, match="segmenter-fcdensenet-lite") as info:
        resolve_bundle("weights/no-such-bundle")
    assert "not found" in str(info.value) and "ensemble-lite" in str(info.value)
    with pytest.raises(WeightsError, match="no learner bundles"):
        load_learner_set("no-such-set")


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    local = tmp_path / "weights" / "ensemble-lite"
    shutil.copytree(WEIGHTS / "ensemble-lite", local)
    monkeypatch.chdir(tmp_path)
    assert resolve_bundle("weights/ensemble-lite") == Path("weights/ensemble-lite")
    _edit(local, lambda c: c.update(temperature=3.0), rehash=True)
    assert load_weight_module("weights/ensemble-lite")[1]["temperature"] == 3.0


def test_absolute_missing_paths_do_not_fall_back(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        resolve_bundle(tmp_path / "ensemble-lite")


# --- pipeline specs -------------------------------------------------------------------------------------------


def test_pipeline_spec_is_verified(tmp_path):
    folder = tmp_path / "pipe"
    write_pipeline_spec(folder, {"format": "patchflannel-pipeline", "segmenter": "segmenter", "learners": "learners",
                                 "ensemble": None, "k": 8, "seed": 0})
    assert read_pipeline_spec(folder)["k"] == 8
    spec = json.loads((folder / "pipeline.json").read_text())
    spec["k"] = 1
    (folder / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(WeightsError, match=r"pipeline\.json.*config_sha256"):
        read_pipeline_spec(folder)
    assert read_pipeline_spec(folder, verify=False)["k"] == 1
    spec["k"] = 0
    (folder / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(WeightsError, match="positive integer"):
        rehash_bundle(folder)
