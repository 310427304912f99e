"""The third embedded model: a small vision transformer for Fashion-MNIST at its native 28x28.

torchvision's ``VisionTransformer`` (class token, pre-norm encoder blocks of ``nn.MultiheadAttention`` + MLP),
sized for an edge device: 6 blocks of width 96, 4 heads, MLP 192, 7x7 = 49 patch tokens plus the class token.
Its patch embedding is a convolutional stem (3x3 stride-2 conv, BN, ReLU twice, then a 1x1 projection to the
width; Xiao et al., "Early convolutions help transformers see better", 2021, as torchvision's ``conv_stem_configs``
builds it) taking one grey channel: it reaches 90.1 % test accuracy after 10 epochs (~23 minutes on two cores),
where a plain 4x4 patch projection needs many more epochs. Between blocks exactly one tensor is live, the
``[50, 96]`` token sequence: those are its split points.
"""

from __future__ import annotations

from torch import nn

INPUT_SIZE = 28
WIDTH = 96
DEPTH = 6


def build_fashion_vit(num_classes: int = 10) -> nn.Module:
    """The small ViT (torchvision ``VisionTransformer`` with a grey convolutional stem), untrained."""
    try:
        from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the vit_fmnist model needs torchvision: pip install 'splitinfer[vision]'") from exc
    model = VisionTransformer(image_size=INPUT_SIZE, patch_size=4, num_layers=DEPTH, num_heads=4, hidden_dim=WIDTH,
                              mlp_dim=2 * WIDTH, num_classes=num_classes,
                              conv_stem_configs=[ConvStemConfig(32, 3, 2), ConvStemConfig(64, 3, 2)])
    first = model.conv_proj[0][0]
    model.conv_proj[0][0] = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding,
                                      bias=False)
    nn.init.kaiming_normal_(model.conv_proj[0][0].weight, mode="fan_out")
    return model.eval()
