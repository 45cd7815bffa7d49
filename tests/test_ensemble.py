import pytest
import torch
import torch.nn.functional as F

from patchflannel.ensemble.fit import WeightModuleConfig, fit_weight_module
from patchflannel.ensemble.module import FlannelWeightModule, load_weight_module, save_weight_module
from patchflannel.losses import FocalLoss, class_alpha


def test_focal_loss_is_cross_entropy_at_gamma_0_and_alpha_1():
    torch.manual_seed(0)
    logits, target = torch.randn(64, 4) * 3, torch.randint(0, 4, (64,))
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(FocalLoss(alpha=torch.ones(4), gamma=0.0, reduction="sum")(logits, target),
                               F.cross_entropy(logits, target, reduction="sum"))


def test_focal_loss_matches_its_formula_and_down_weights_easy_samples():
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([0, 0])
    alpha = torch.tensor([0.5, 1.0, 1.0, 1.5])
    p = logits.softmax(-1)[:, 0]
    expected = -alpha[0] * (1 - p) ** 2 * p.log()
    torch.testing.assert_close(FocalLoss(alpha, gamma=2.0, reduction="none")(logits, target), expected)
    easy, hard = FocalLoss(gamma=2.0, reduction="none")(logits, target)
    ce_easy, ce_hard = F.cross_entropy(logits, target, reduction="none")
    assert easy / ce_easy < hard / ce_hard  # the confident sample loses more of its weight
    with pytest.raises(ValueError):
        FocalLoss(gamma=-1)


def test_class_alpha_is_inverse_frequency_summing_to_c():
    alpha = class_alpha(torch.tensor([0] * 10 + [1] * 20 + [2] * 40 + [3] * 10))
    assert alpha.sum().item() == pytest.approx(4.0)
    assert alpha[0] / alpha[1] == pytest.approx(2.0) and alpha[1] / alpha[2] == pytest.approx(2.0)


def test_weight_module_computes_the_published_formula():
    torch.manual_seed(0)
    module = FlannelWeightModule(num_learners=5, num_classes=4)
    probs = torch.softmax(torch.randn(3, 5, 4), -1)
    logits = module(probs)
    assert logits.shape == (3, 4)
    f = probs.flatten(1)
    w = torch.tanh(module.weights(torch.stack([torch.outer(v, v).flatten() for v in f])))
    assert w.abs().max() <= 1
    torch.testing.assert_close(logits, (w[:, :, None] * probs).sum(1))
    torch.testing.assert_close(module.learner_weights(probs), w)
    with pytest.raises(ValueError, match="expected"):
        module(torch.rand(3, 4, 4))


def _one_reliable_learner(n=512, num_learners=3, seed=0):
    """Learner 0 is always right, the others random."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 4, (n,), generator=g)
    probs = torch.softmax(torch.randn(n, num_learners, 4, generator=g), -1)
    probs[:, 0] = F.one_hot(target, 4).float() * 0.7 + 0.075
    return probs, target


@pytest.mark.parametrize("hidden", [None, 16])
def test_fitted_weight_module_trusts_the_right_learner(hidden):
    probs, target = _one_reliable_learner()
    module = fit_weight_module(probs, target, WeightModuleConfig(hidden=hidden, steps=200))
    weights = module.learner_weights(probs).mean(0)
    assert weights[0] > weights[1:].abs().max()
    assert (module(probs).argmax(-1) == target).float().mean() > 0.95


def test_weight_module_fit_is_deterministic_and_round_trips(tmp_path):
    from patchflannel import WeightsError

    probs, target = _one_reliable_learner(n=128)
    config = WeightModuleConfig(steps=30, seed=3)
    a, b = fit_weight_module(probs, target, config), fit_weight_module(probs, target, config)
    torch.testing.assert_close(a(probs), b(probs), rtol=0, atol=0)
    save_weight_module(tmp_path / "ens", a, learners=["x", "y", "z"], classes=["a", "b", "c", "d"], config=config)
    loaded, saved = load_weight_module(tmp_path / "ens")
    assert saved["learners"] == ["x", "y", "z"] and saved["training"]["steps"] == 30
    with torch.no_grad():
        torch.testing.assert_close(loaded(probs), a(probs))
    (tmp_path / "ens" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="SHA-256"):
        load_weight_module(tmp_path / "ens")


def test_weight_module_fit_refuses_rejected_rows():
    probs, target = _one_reliable_learner(n=8)
    probs[2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_weight_module(probs, target)


def test_ranking_report_matches_hand_values():
    from patchflannel.evaluation.metrics import ranking_report

    truth = [0, 0, 1, 1]
    scores = torch.tensor([[0.9, 0.1, 0, 0], [0.4, 0.6, 0, 0], [0.6, 0.4, 0, 0], [0.2, 0.8, 0, 0]]).numpy()
    report = ranking_report(truth, scores)
    assert report["covid"]["roc_auc"] == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered
    assert report["covid"]["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert torch.isnan(torch.tensor(report["normal"]["roc_auc"]))  # no positive example
