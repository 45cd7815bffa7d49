import json

import numpy as np
import pytest
import torch

from patchflannel.segment import Segmenter
from patchflannel.segment.train import SegTrainConfig, train


def tiny_config(epochs):
    return SegTrainConfig(size=64, epochs=epochs, batch_size=8, lr=3e-3)


@pytest.mark.slow
def test_short_training_lowers_the_loss_and_exports_a_bundle(lungseg_dir, tmp_path):
    result = train(lungseg_dir, tmp_path, tiny_config(4), device="cpu", progress=False, limit=24)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] * 0.9
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["preprocess"]["size"] == 64 and config["architecture"]["preset"] == "fcdensenet_lite"
    split = (tmp_path / "split.csv").read_text().splitlines()
    assert split[0] == "patient_id,split" and len(split) == 558  # every lungseg patient, one row each
    # The exported bundle loads and segments.
    seg = Segmenter.from_bundle(tmp_path / "bundle", device="cpu")
    assert seg.probabilities(np.zeros((2, 64, 64), np.float32)).shape == (2, 64, 64)
    # A further cycle starts from the bundle: its first epoch is better than the first one from scratch.
    cfg = tiny_config(1)
    cfg.init_from = str(tmp_path / "bundle")
    cfg.split_file = str(tmp_path / "split.csv")
    cfg.seed = 1  # a new augmentation draw, the same patients
    again = train(lungseg_dir, tmp_path / "cycle2", cfg, device="cpu", progress=False, limit=24)
    assert again["history"][0]["train_loss"] < losses[0]
    assert (tmp_path / "cycle2" / "split.csv").read_text() == (tmp_path / "split.csv").read_text()
    assert json.loads((tmp_path / "cycle2" / "bundle" / "config.json").read_text())["training"]["init_from"]


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(lungseg_dir, tmp_path):
    train(lungseg_dir, tmp_path / "straight", tiny_config(2), device="cpu", progress=False, limit=16)
    train(lungseg_dir, tmp_path / "resumed", tiny_config(2), device="cpu", progress=False, limit=16,
          max_epochs_this_run=1)
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert len(history) == 1  # interrupted after one epoch
    train(lungseg_dir, tmp_path / "resumed", tiny_config(2), device="cpu", progress=False, limit=16)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_sample_caches_make_the_run_folder_self_contained(lungseg_dir, tmp_path):
    run = tmp_path / "run"
    train(lungseg_dir, run, tiny_config(1), device="cpu", progress=False, limit=8, max_epochs_this_run=0)
    assert sorted(p.name for p in run.glob("samples-*.npz")) == ["samples-train-64.npz", "samples-val-64.npz"]
    # Another machine: the run folder and the manifest alone, none of the films.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "lungseg").mkdir(parents=True)
    (elsewhere / "lungseg" / "manifest.csv").write_bytes((lungseg_dir / "manifest.csv").read_bytes())
    for f in run.iterdir():
        (elsewhere / f.name).write_bytes(f.read_bytes())
    moved = train(elsewhere / "lungseg", elsewhere, tiny_config(1), device="cpu", progress=False, limit=8)
    here = train(lungseg_dir, run, tiny_config(1), device="cpu", progress=False, limit=8)
    assert moved["history"][0]["train_loss"] == here["history"][0]["train_loss"]
    with np.load(run / "samples-train-64.npz") as cached:
        assert cached["images"].dtype == np.uint8 and cached["images"].shape == (8, 64, 64)
        assert str(cached["names"][0]).startswith("images/")


def test_a_sample_cache_is_not_reused_under_other_preprocessing(lungseg_dir, tmp_path):
    from patchflannel.manifest import read_manifest
    from patchflannel.preprocess import SegmenterPreprocess
    from patchflannel.segment.train import load_samples

    rows = read_manifest(lungseg_dir / "manifest.csv")[:2]
    cache = tmp_path / "samples.npz"
    first = load_samples(rows, SegmenterPreprocess(size=32), progress=False, cache=cache)
    again = load_samples(rows, SegmenterPreprocess(size=32), progress=False, cache=cache)
    assert torch.equal(first.images, again.images)
    other = load_samples(rows, SegmenterPreprocess(size=32, gamma=1.0), progress=False, cache=cache)
    assert not torch.equal(first.images, other.images)  # recomputed (and the cache rewritten)
