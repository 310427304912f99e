"""The embedded default model: a compact CNN for 28x28 grey images (Fashion-MNIST).

Dense 3x3 convolutions with batch norm (they train several times faster than depthwise convolutions on a
CPU), two stride-2 downsamplings and residual blocks at 14x14 and 7x7, then a pooled linear classifier.
It is a plain ``nn.Sequential`` of blocks; the staged-model cutter does not rely on that, it finds the
boundaries by tracing, but it makes every block boundary a candidate split.
"""

from __future__ import annotations

from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv2d + BatchNorm + ReLU (optional)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut (ResNet basic block, equal channels)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels)
        self.conv2 = ConvBNAct(channels, channels, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.conv2(self.conv1(x)))


class Classifier(nn.Module):
    """Global average pool, dropout, linear."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.pool(x).flatten(1)))


class DefaultNet(nn.Sequential):
    """stem(28x28x32) -> down(14x14x48) -> res(48) -> down(7x7x96) -> res(96) -> classifier. ~0.26 M params."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 48, 96)):
        c1, c2, c3 = widths
        super().__init__(
            ConvBNAct(1, c1),
            ConvBNAct(c1, c2, stride=2),
            ResidualBlock(c2),
            ConvBNAct(c2, c3, stride=2),
            ResidualBlock(c3),
            Classifier(c3, num_classes),
        )


def build_default(num_classes: int = 10) -> DefaultNet:
    """The embedded default architecture (untrained)."""
    return DefaultNet(num_classes)
