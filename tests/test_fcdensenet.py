import pytest
import torch

from patchflannel import WeightsError
from patchflannel.segment import PRESETS, build_segmentation_model, create_fcdensenet


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset,expected_millions",
    [("fcdensenet56", 1.37), ("fcdensenet67", 3.47), ("fcdensenet103", 9.3), ("fcdensenet_lite", 1.17)],
)
def test_parameter_counts(preset, expected_millions):
    # FC-DenseNet103 has ~9.3M parameters (Jegou et al. report 9.4M with a 12-class head).
    assert n_params(create_fcdensenet(preset)) / 1e6 == pytest.approx(expected_millions, rel=0.03)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_output_shape_matches_input(preset):
    net = create_fcdensenet(preset).eval()
    size = net.divisor * 2
    with torch.no_grad():
        out = net(torch.randn(2, 1, size, size + net.divisor))
    assert out.shape == (2, 1, size, size + net.divisor)


def test_bad_input_size_is_explained():
    net = create_fcdensenet("fcdensenet_lite")
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.zeros(1, 1, 40, 40))


def test_overrides_and_classes():
    net = create_fcdensenet("fcdensenet56", growth_rate=8, num_classes=3, in_channels=3).eval()
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(KeyError, match="unknown FC-DenseNet preset"):
        create_fcdensenet("fcdensenet999")


def test_smp_model_builds_offline():
    model = build_segmentation_model({"type": "smp", "arch": "Unet", "encoder_name": "resnet18"})
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_smp_encoder_weights_from_local_file(tmp_path):
    import torchvision

    from patchflannel.segment.train import load_encoder_weights

    model = build_segmentation_model({"type": "smp", "arch": "Unet", "encoder_name": "resnet18"})
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pt")
    load_encoder_weights(model, tmp_path / "resnet18.pt")
    # RGB first conv summed to one grey channel; deeper layers copied as they are.
    torch.testing.assert_close(model.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.encoder.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="no tensor matches"):
        load_encoder_weights(model, tmp_path / "bad.pt")


def test_memory_efficient_variant_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = create_fcdensenet("fcdensenet_lite", dropout=0.0)
    efficient = create_fcdensenet("fcdensenet_lite", dropout=0.0, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    plain(x).square().mean().backward()
    efficient(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
