"""Model registry: the embedded default and torchvision architectures, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from splitinfer.models.default import DefaultNet, build_default
from splitinfer.models.fashion_mobilenet import build_fashion_mobilenet
from splitinfer.models.fashion_vit import build_fashion_vit
from splitinfer.models.torchvision_zoo import (
    TorchvisionModel,
    build_torchvision,
    is_torchvision_model,
    torchvision_model,
    torchvision_names,
    unknown_model_message,
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model trained here on Fashion-MNIST whose weights ship in ``splitinfer/weights/<name>*``.

    ``size``: the side of the square grey input the Fashion-MNIST images are rendered at (bilinear, as the
    edge agent resizes uploads); ``exits``: the boundaries that get exit heads; ``epochs``: the backbone's
    training epochs that reproduce the committed weights; ``train_settings``: :class:`partitioner.train.TrainConfig`
    fields that differ from its defaults for this model (a transformer trains with AdamW).
    """

    name: str
    size: int
    build: Callable[[int], nn.Module]
    exits: tuple[int, ...]
    epochs: int
    file_stem: str
    train_settings: tuple[tuple[str, object], ...] = ()

    def example(self, batch: int = 1) -> torch.Tensor:
        """A zero input of the model's shape (for staging)."""
        return torch.zeros(batch, 1, self.size, self.size)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "default": EmbeddedModel("default", 28, build_default, (3, 6, 8, 11), 9, "default"),
    "mobilenet_v2_fmnist": EmbeddedModel("mobilenet_v2_fmnist", 64, build_fashion_mobilenet, (17, 27, 38, 48), 4,
                                         "mobilenet_v2_fmnist"),
    "vit_fmnist": EmbeddedModel("vit_fmnist", 28, build_fashion_vit, (7, 9, 11, 13), 10, "vit_fmnist",
                                (("optimizer", "adamw"), ("lr", 2e-3), ("weight_decay", 0.05))),
}


def embedded_model(name: str) -> EmbeddedModel:
    """The embedded model called ``name``; ValueError naming the choices otherwise."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; choose {', '.join(EMBEDDED_MODELS)}") from None


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build an (untrained) model by name: an embedded model (:data:`EMBEDDED_MODELS`) or any torchvision
    classification model (:mod:`splitinfer.models.torchvision_zoo`)."""
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].build(num_classes or 10)
    if is_torchvision_model(name):
        return build_torchvision(name, num_classes)
    raise ValueError(unknown_model_message(name, tuple(EMBEDDED_MODELS)))


def example_input(name: str, batch: int = 1, size: int | None = None) -> torch.Tensor:
    """A random input of the right shape for a registered model (a torchvision model at its published size
    unless ``size`` is given)."""
    if name in EMBEDDED_MODELS:
        side = EMBEDDED_MODELS[name].size
        return torch.randn(batch, 1, side, side)
    s = size or torchvision_model(name).input_shape[1]
    return torch.randn(batch, 3, s, s)


__all__ = ["DefaultNet", "EMBEDDED_MODELS", "EmbeddedModel", "TorchvisionModel", "build_default",
           "build_fashion_mobilenet", "build_fashion_vit", "build_model", "build_torchvision", "embedded_model",
           "example_input", "is_torchvision_model", "torchvision_model", "torchvision_names",
           "unknown_model_message"]
