"""Model registry: the embedded default and torchvision architectures, by name."""

from __future__ import annotations

import torch
from torch import nn

from splitinfer.models.default import DefaultNet, build_default

TORCHVISION_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "vgg16")


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build an (untrained) model by name: ``default`` or one of :data:`TORCHVISION_MODELS`."""
    if name == "default":
        return build_default(num_classes or 10)
    if name in TORCHVISION_MODELS:
        try:
            import torchvision.models as tvm
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(f"model {name!r} needs torchvision: pip install 'splitinfer[vision]'") from exc
        model = getattr(tvm, name)(weights=None, num_classes=num_classes or 1000)
        return model.eval()
    raise ValueError(f"unknown model {name!r}; choose 'default' or one of {', '.join(TORCHVISION_MODELS)}")


def example_input(name: str, batch: int = 1, size: int | None = None) -> torch.Tensor:
    """A random input of the right shape for a registered model."""
    if name == "default":
        return torch.randn(batch, 1, 28, 28)
    s = size or 224
    return torch.randn(batch, 3, s, s)


__all__ = ["DefaultNet", "build_default", "build_model", "example_input", "TORCHVISION_MODELS"]
