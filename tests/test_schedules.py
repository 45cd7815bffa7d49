"""Optimisers, discriminative layer groups and learning-rate policies of the training loop."""
import pytest
import torch

from patchflannel.training.schedules import LRPolicy, SCHEDULES, layer_groups, make_optimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(4)])


def _run(policy: LRPolicy, optimizer, epochs: int, steps: int, scores=None) -> list[list[float]]:
    model_params = [p for g in optimizer.param_groups for p in g["params"]]
    per_epoch = []
    for epoch in range(epochs):
        for _ in range(steps):
            loss = sum((p ** 2).sum() for p in model_params)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            policy.step()
        policy.epoch_end(scores[epoch] if scores else 0.5)
        per_epoch.append(policy.get_last_lr())
    return per_epoch


def test_layer_groups_decay_towards_the_input():
    params = list(_model().parameters())  # 8 tensors
    groups = layer_groups(params, 1e-2, layer_decay=0.5, n_groups=4)
    assert [len(g["params"]) for g in groups] == [2, 2, 2, 2]
    assert [g["lr"] for g in groups] == pytest.approx([1.25e-3, 2.5e-3, 5e-3, 1e-2])
    assert sum(len(g["params"]) for g in layer_groups(params, 1e-2)) == 8  # decay 1: one group
    with pytest.raises(ValueError, match="layer_decay"):
        layer_groups(params, 1e-2, layer_decay=1.5)


def test_step_decay_and_plateau():
    opt = make_optimizer(layer_groups(list(_model().parameters()), 0.1), "sgd", weight_decay=0.0, momentum=0.9)
    lrs = _run(LRPolicy(opt, "step", epochs=5, steps_per_epoch=2, step_size=2, gamma=0.1), opt, 5, 2)
    assert [lr[0] for lr in lrs] == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])

    opt = make_optimizer(layer_groups(list(_model().parameters()), 0.1), "adam", weight_decay=0.0)
    lrs = _run(LRPolicy(opt, "plateau", epochs=5, steps_per_epoch=1, gamma=0.5), opt, 5, 1,
               scores=[0.5, 0.6, 0.6, 0.6, 0.6])
    assert [lr[0] for lr in lrs] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05])  # 3 epochs without gain


def test_cyclic_policies_keep_each_groups_rate_and_cycle_momentum():
    groups = layer_groups(list(_model().parameters()), 1e-2, layer_decay=0.5, n_groups=2)
    opt = make_optimizer(groups, "sgd", weight_decay=0.0, momentum=0.9)
    policy = LRPolicy(opt, "cyclic", epochs=4, steps_per_epoch=4, cycle_epochs=2)
    seen = []
    for _ in range(8):
        opt.step()
        policy.step()
        seen.append((policy.get_last_lr(), opt.param_groups[0]["momentum"]))
    peak = max(seen, key=lambda s: s[0][1])
    assert peak[0] == pytest.approx([5e-3, 1e-2])  # each group cycles up to its own rate
    assert peak[1] == pytest.approx(0.85)  # momentum low where the rate is high
    assert min(s[0][1] for s in seen) == pytest.approx(1e-3)

    opt = make_optimizer(layer_groups(list(_model().parameters()), 1e-2), "adamw", weight_decay=0.0)
    lrs = _run(LRPolicy(opt, "onecycle", epochs=3, steps_per_epoch=5), opt, 3, 5)
    assert 5e-3 < max(lr[0] for lr in lrs) <= 1e-2 and lrs[-1][0] < 1e-3  # up, then annealed


def test_rescale_carries_a_schedules_progress_to_a_new_rate():
    opt = make_optimizer(layer_groups(list(_model().parameters()), 0.1), "sgd", weight_decay=0.0)
    policy = LRPolicy(opt, "step", epochs=4, steps_per_epoch=1, step_size=1, gamma=0.5)
    _run(policy, opt, 2, 1)
    assert policy.get_last_lr() == pytest.approx([0.025])
    policy.rescale(2.0)  # the run goes on as if it had started at 0.2
    _run(policy, opt, 1, 1)
    assert policy.get_last_lr() == pytest.approx([0.025])


def test_unknown_names_are_refused():
    opt = make_optimizer([{"params": list(_model().parameters()), "lr": 0.1}], "sgd", weight_decay=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        LRPolicy(opt, "cosine", epochs=1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer([{"params": list(_model().parameters()), "lr": 0.1}], "lion", weight_decay=0)
    assert "constant" in SCHEDULES


def test_loss_scaling_only_for_float16():
    from patchflannel.training.loop import grad_scaler, optimization_step

    assert not grad_scaler(torch.device("cpu"), amp=True).is_enabled()  # bf16 on CPU needs none
    model = _model()
    opt = make_optimizer(layer_groups(list(model.parameters()), 0.1), "sgd", weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = optimization_step(model, torch.randn(4, 3), lambda out: (out ** 2).mean(), opt, None,
                             device=torch.device("cpu"), amp=True, channels_last=False,
                             scaler=grad_scaler(torch.device("cpu"), amp=True))
    assert loss > 0 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
