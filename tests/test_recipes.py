"""Training recipes of the learner trainer: LR range test, label-free rotation pretraining and
fine-tuning from it, focal-loss balancing."""
import json

import pytest
import torch

from patchflannel.learners.train import (
    LearnerTrainConfig,
    find_lr,
    rotate_quarters,
    train,
)
from patchflannel.learners.data import style_balanced_weights
from patchflannel.training.lr_finder import lr_range_test, suggest

PATCH = 96  # the 384 px packs of conftest.py
TINY = dict(learner="resnet18", patch_size=PATCH, epochs=1, batch_size=8, val_k=2, min_lung_pixels=100)


def test_range_test_finds_the_working_rates_of_a_known_problem():
    """Noisy least squares with curvature ~1: SGD diverges above lr ~2 and the loss falls
    fastest some way below it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x @ (torch.randn(8, generator=gen) * 3) + 0.3 * torch.randn(256, generator=gen)
    w = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.SGD([w], lr=1.0)

    def step():
        batch = torch.randint(0, 256, (32,), generator=gen)
        loss = 0.5 * ((x[batch] @ w - y[batch]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    result = lr_range_test(step, opt, start_lr=1e-4, end_lr=100.0, steps=200, smoothing=0.9)
    assert result["lr"][-1] < 100.0  # stopped when the loss diverged
    assert 1e-3 < result["steepest"] < 2.0 and 0.05 < result["minimum"] < 4.0
    low, high = result["suggested_range"]
    assert low <= high
    with pytest.raises(ValueError, match="stopped after"):
        suggest([1e-3, 1e-2, 1e-1], [1.0, 0.9, 5.0])


def test_style_balanced_weights_share_each_class_equally_among_its_sources():
    labels = [0, 0, 0, 3, 3, 3, 3, 3, -1]
    sources = ["cohen", "cohen", "cohen", "nih", "nih", "nih", "kermany", "cohen", "adult"]
    w = style_balanced_weights(labels, sources).numpy()
    share = {key: sum(wi for wi, lab, src in zip(w, labels, sources) if (lab, src) == key)
             for key in {(lab, src) for lab, src in zip(labels, sources)}}
    assert share[0, "cohen"] == pytest.approx(1 / 2)  # covid: one source holds the whole class share
    for source in ("nih", "kermany", "cohen"):  # normal: its three sources share the class equally
        assert share[3, source] == pytest.approx(1 / 6)
    assert w[-1] == 0  # labels outside the classes are never drawn
    assert w[7] == pytest.approx(3 * w[3])  # the one Cohen normal weighs as much as the three NIH ones together


def test_rotate_quarters_is_rot90():
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    out = rotate_quarters(x, torch.tensor([0, 3]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], torch.rot90(x[1], 3, dims=(-2, -1)))


@pytest.mark.slow
def test_find_lr_writes_its_plot_and_suggestion(packs, tmp_path):
    pytest.importorskip("matplotlib")
    result = find_lr(packs, tmp_path, LearnerTrainConfig(**TINY), device="cpu", progress=False, limit=8,
                     start_lr=1e-5, end_lr=10.0, steps=20)
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["suggested_range"] == result["suggested_range"] and len(saved["lr"]) == len(saved["loss"]) >= 8
    assert (tmp_path / "lr_find.png").stat().st_size > 5000
    assert 1e-5 <= result["steepest"] <= 10.0


@pytest.mark.slow
def test_rotation_pretraining_then_fine_tuning_from_it(packs, tmp_path):
    """The pretext task trains on every film of the training patients (unlabelled ones too) and
    its bundle is a starting point for the four-class task."""
    pre = train(packs, tmp_path / "pre", LearnerTrainConfig(**TINY, task="rotation"), device="cpu",
                progress=False, limit=12)
    assert 0 <= pre["best_val_macro_f1"] <= 1
    weights = tmp_path / "pre" / "bundle" / "model.safetensors"
    pre_config = json.loads((tmp_path / "pre" / "bundle" / "config.json").read_text())
    assert pre_config["classes"] == ["0", "90", "180", "270"] and pre_config["training"]["task"] == "rotation"
    cfg = LearnerTrainConfig(**TINY, weights=str(weights), freeze_fraction=0.5, balance="focal", augment="strong")
    tuned = train(packs, tmp_path / "tuned", cfg, device="cpu", progress=False, limit=8)
    assert len(tuned["history"]) == 1
    from safetensors.torch import load_file
    start = load_file(weights)
    final = torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=True)["model"]
    first = next(k for k in final if k.endswith("weight") and final[k].dim() == 4)
    torch.testing.assert_close(final[first], start[first].float())  # frozen, and loaded from the pretext model
