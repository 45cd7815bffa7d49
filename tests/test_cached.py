"""Training on a frozen, cached trunk: the split is exact and banks resume (training itself,
and the engine's agreement with the banks, in test_cross_validation's converged fold)."""
import json

import numpy as np
import pytest
import torch

from patchflannel.learners.cached import build_bank, split_trunk
from patchflannel.learners.data import read_rows
from patchflannel.learners.registry import create_learner
from patchflannel.learners.train import LearnerTrainConfig

PATCH = 96  # the 384 px packs of conftest.py


def test_trunk_and_top_compose_to_the_model():
    model = create_learner("efficientnet_lite0", weights="imagenet").eval()
    trunk, top = split_trunk(model, 6)
    x = torch.randn(3, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(top.eval()(trunk(x)), model(x), atol=1e-5)
    assert not any(p.requires_grad for p in trunk.parameters())
    assert all(p.requires_grad for p in top.parameters())
    with pytest.raises(ValueError, match="EfficientNet-style"):
        split_trunk(create_learner("resnet18"), 2)


def _cfg(**kw):
    return LearnerTrainConfig(**{"learner": "efficientnet_lite0", "weights": "imagenet", "frozen_blocks": 6,
                                 "patch_size": PATCH, "epochs": 3, "batch_size": 16, "patches_per_image": 4,
                                 "bank_patches": 4, "val_k": 4, "min_lung_pixels": 100, "schedule": "plateau",
                                 "lr": 1e-3, "patience": 3, "split_fractions": {"train": 0.5, "val": 0.5, "test": 0.0},
                                 **kw})


@pytest.mark.slow
def test_a_killed_bank_build_resumes_to_the_same_bank(packs, tmp_path, monkeypatch):
    rows = read_rows(packs)[:20]
    cfg = _cfg()
    trunk, _ = split_trunk(create_learner(cfg.learner, weights="imagenet"), cfg.frozen_blocks)
    whole = build_bank(tmp_path / "whole", rows, cfg, trunk, kind="train", per_film=4, chunk=8, progress=False)

    import patchflannel.learners.cached as cached

    real, calls = cached._bank_items, []

    def dies_on_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cached, "_bank_items", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_bank(tmp_path / "killed", rows, cfg, trunk, kind="train", per_film=4, chunk=8, progress=False)
    assert json.loads((tmp_path / "killed" / "progress.json").read_text())["done"] == 8
    monkeypatch.setattr(cached, "_bank_items", real)
    resumed = build_bank(tmp_path / "killed", rows, cfg, trunk, kind="train", per_film=4, chunk=8, progress=False)
    assert np.array_equal(np.asarray(resumed.features), np.asarray(whole.features))
    with pytest.raises(ValueError, match="other settings"):
        build_bank(tmp_path / "whole", rows, _cfg(seed=1), trunk, kind="train", per_film=4, progress=False)
