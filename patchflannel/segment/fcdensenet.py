"""FC-DenseNet ("The One Hundred Layers Tiramisu", Jégou et al., 2017) for lung segmentation.

The network is written here rather than taken from a third-party package: the design
packages have none, and the small PyPI candidates are single-maintainer 3-D/medical
research code with heavy extra dependencies.

Presets follow the paper (``fcdensenet56``, ``fcdensenet67``, ``fcdensenet103``) and add
``fcdensenet_lite``, a narrow variant sized to train on a 2-core CPU.

Examples:
    >>> import torch
    >>> from patchflannel.segment.fcdensenet import create_fcdensenet
    >>> net = create_fcdensenet("fcdensenet56", in_channels=1, num_classes=1)
    >>> net(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 1, 64, 64])
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["PRESETS", "DenseBlock", "DenseLayer", "FCDenseNet", "FCDenseNetConfig", "TransitionDown",
           "create_fcdensenet"]


@dataclass(frozen=True)
class FCDenseNetConfig:
    """Shape of an FC-DenseNet.

    Attributes:
        down_layers: layers per dense block on the down path (the up path mirrors it).
        bottleneck_layers: layers of the dense block at the lowest resolution.
        growth_rate: feature maps each dense layer adds (``k`` in the paper).
        first_conv_channels: output channels of the first 3x3 convolution.
        dropout: dropout after every convolution (0.2 in the paper).
        in_channels: input image channels (1 for grey CXRs).
        num_classes: output channels (1 = lung logit).
        memory_efficient: recompute each dense layer's concatenated input in the backward
            pass instead of storing it (less training memory, more compute).
    """

    down_layers: tuple[int, ...] = (4, 4, 4, 4, 4)
    bottleneck_layers: int = 4
    growth_rate: int = 12
    first_conv_channels: int = 48
    dropout: float = 0.2
    in_channels: int = 1
    num_classes: int = 1
    memory_efficient: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["down_layers"] = list(self.down_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FCDenseNetConfig:
        d = dict(d)
        d["down_layers"] = tuple(d["down_layers"])
        return cls(**d)


PRESETS: dict[str, FCDenseNetConfig] = {
    "fcdensenet56": FCDenseNetConfig((4, 4, 4, 4, 4), 4, 12, 48),
    "fcdensenet67": FCDenseNetConfig((5, 5, 5, 5, 5), 5, 16, 48),
    "fcdensenet103": FCDenseNetConfig((4, 5, 7, 10, 12), 15, 16, 48),
    # Four resolution levels and a narrow first conv: ~5x cheaper per pixel than 56.
    "fcdensenet_lite": FCDenseNetConfig((3, 4, 5, 6), 6, 12, 24),
}


class DenseLayer(nn.Sequential):
    """BN - ReLU - 3x3 conv - dropout, producing ``growth_rate`` new maps."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float):
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        )


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and all earlier layers' maps.

    Returns only the new maps (``n_layers * growth_rate`` channels); the caller decides
    whether to concatenate them with the input, as the paper does on the down path.
    """

    def __init__(self, in_channels: int, n_layers: int, growth_rate: int, dropout: float,
                 memory_efficient: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, dropout) for i in range(n_layers)
        )
        self.memory_efficient = memory_efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            if self.memory_efficient and torch.is_grad_enabled():
                # The concatenation and BN-ReLU are recomputed in backward, not kept (Pleiss et al., 2017).
                new = checkpoint(lambda *f, layer=layer: layer(torch.cat(f, 1)), *features, use_reentrant=False)
            else:
                new = layer(torch.cat(features, 1))
            features.append(new)
        return torch.cat(features[1:], 1)


class TransitionDown(nn.Sequential):
    def __init__(self, channels: int, dropout: float):
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            nn.MaxPool2d(2),
        )


class FCDenseNet(nn.Module):
    """Fully convolutional DenseNet; input height and width must be divisible by 2**depth."""

    def __init__(self, config: FCDenseNetConfig = FCDenseNetConfig()):
        super().__init__()
        self.config = config
        c = config
        k = c.growth_rate
        self.first_conv = nn.Conv2d(c.in_channels, c.first_conv_channels, 3, padding=1, bias=False)

        channels = c.first_conv_channels
        skip_channels = []
        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        for n in c.down_layers:
            self.down_blocks.append(DenseBlock(channels, n, k, c.dropout, c.memory_efficient))
            channels += n * k
            skip_channels.append(channels)
            self.transitions_down.append(TransitionDown(channels, c.dropout))

        self.bottleneck = DenseBlock(channels, c.bottleneck_layers, k, c.dropout, c.memory_efficient)
        up_in = c.bottleneck_layers * k  # only the new maps go up (saves memory, as in the paper)

        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for n, skip in zip(reversed(c.down_layers), reversed(skip_channels)):
            self.transitions_up.append(nn.ConvTranspose2d(up_in, up_in, 3, stride=2, padding=1, output_padding=1))
            self.up_blocks.append(DenseBlock(up_in + skip, n, k, c.dropout, c.memory_efficient))
            last_in = up_in + skip
            up_in = n * k
        # The last up block's input is concatenated with its output before the classifier.
        self.classifier = nn.Conv2d(last_in + up_in, c.num_classes, 1)

    @property
    def divisor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** len(self.config.down_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {self.divisor}")
        x = self.first_conv(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down):
            x = torch.cat([x, block(x)], 1)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        n_up = len(self.up_blocks)
        for i, (up, block, skip) in enumerate(zip(self.transitions_up, self.up_blocks, reversed(skips))):
            x = torch.cat([up(x), skip], 1)
            new = block(x)
            x = torch.cat([x, new], 1) if i == n_up - 1 else new
        return self.classifier(x)


def create_fcdensenet(preset: str = "fcdensenet_lite", **overrides) -> FCDenseNet:
    """Build an FC-DenseNet from a preset name, overriding any `FCDenseNetConfig` field."""
    if preset not in PRESETS:
        raise KeyError(f"unknown FC-DenseNet preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset].to_dict()
    base.update(overrides)
    return FCDenseNet(FCDenseNetConfig.from_dict(base))
