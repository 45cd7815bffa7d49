import pytest
import torch
import torch.nn.functional as F

from patchflannel.ensemble import FlannelWeightModule, FocalLoss, class_alpha


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


def test_weight_module_learns_to_trust_the_right_learner():
    """Learner 0 is always right, the others random: the module should weight learner 0 most."""
    torch.manual_seed(0)
    n, num_learners = 512, 3
    target = torch.randint(0, 4, (n,))
    probs = torch.softmax(torch.randn(n, num_learners, 4), -1)
    probs[:, 0] = F.one_hot(target, 4).float() * 0.7 + 0.075
    module = FlannelWeightModule(num_learners, 4, hidden=16)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    loss_fn = FocalLoss(gamma=2.0)
    for _ in range(200):
        opt.zero_grad()
        loss = loss_fn(module(probs), target)
        loss.backward()
        opt.step()
    weights = module.learner_weights(probs).mean(0)
    assert weights[0] > weights[1:].abs().max()
    assert (module(probs).argmax(-1) == target).float().mean() > 0.95
