"""The second embedded model: torchvision's MobileNetV2 for Fashion-MNIST rendered at 64x64.

The topology is torchvision's ``mobilenet_v2`` unchanged apart from the stem, whose first convolution takes one
grey channel instead of three; the classifier has ten outputs. At 64x64 the network has the realistic shape of
an edge CNN (stride-2 stem, inverted residual blocks down to 2x2, 1280 pooled channels): its feature maps early
in the network are far larger than the input, which is what a learned bottleneck has to fix for a split to pay.
"""

from __future__ import annotations

from torch import nn

INPUT_SIZE = 64


def build_fashion_mobilenet(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 (torchvision) with a one-channel stem and ``num_classes`` outputs, untrained."""
    try:
        import torchvision.models as tvm
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the mobilenet_v2_fmnist model needs torchvision: pip install 'splitinfer[vision]'") from exc
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model.eval()
