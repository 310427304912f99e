"""What is being planned: a model (the default, a torchvision architecture, or a user's ``module:factory``),
its weights, its staged form, its exit heads and its input specification."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from splitinfer.bundle import InputSpec, is_safetensors
from splitinfer.errors import BundleError
from splitinfer.exits import ExitHead
from splitinfer.models import (
    EMBEDDED_MODELS,
    build_model,
    is_torchvision_model,
    torchvision_model,
    unknown_model_message,
)
from splitinfer.staged import StagedModel, stage_model


@dataclass
class PlanTarget:
    """A model ready to profile and plan."""

    name: str
    model: nn.Module
    staged: StagedModel
    input_spec: InputSpec
    exits: dict[int, ExitHead] = field(default_factory=dict)
    factory: str | None = None
    weights_note: str = ""
    info: dict = field(default_factory=dict)
    weights_source: str = "random"  # committed, checkpoint, random or unknown (a user's factory may load its own)

    @property
    def random_weights(self) -> bool:
        """True when the weights are an untrained initialisation: timings are real, answers are not."""
        return self.weights_source == "random"

    def weights_warning(self) -> str | None:
        """The warning to show wherever this target is planned or profiled, or None for trained weights."""
        if not self.random_weights:
            return None
        return (f"warning: {self.name} has random weights (no --checkpoint): latency, bytes and energy are "
                "real, but its answers are meaningless and accuracy is not measured; give --checkpoint "
                "W.safetensors with trained weights to serve it")

    def example(self, batch: int = 1) -> torch.Tensor:
        """A deterministic example input (profiling does not depend on the values)."""
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, *self.input_spec.shape, generator=g)


def _load_checkpoint(model: nn.Module, checkpoint: Path) -> None:
    if not checkpoint.is_file():
        raise BundleError(f"checkpoint {checkpoint} does not exist")
    if not is_safetensors(checkpoint):
        raise BundleError(f"checkpoint {checkpoint} is not a safetensors file; pickled checkpoints are refused "
                          "(convert with safetensors.torch.save_file(model.state_dict(), ...))")
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(checkpoint)), strict=True)
    except RuntimeError as exc:
        raise BundleError(f"checkpoint {checkpoint} does not fit the model: {exc}") from exc


def _build_factory(spec: str) -> nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"model {spec!r} must be a registry name or 'package.module:function'")
    try:
        model = getattr(importlib.import_module(mod_name), fn_name)()
    except Exception as exc:  # user code
        raise ValueError(f"model factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_compressed_for(path: Path, model: str):
    """The compressed model written by ``plan compress`` in ``path`` (it must compress embedded model ``model``):
    (model, staged, weights file bytes, recipe for ``plan.model.compression``)."""
    from splitinfer.compression import artifact

    net, info = artifact.load(Path(path), lambda name: EMBEDDED_MODELS[name].build(10),
                              EMBEDDED_MODELS[model].example())
    if info["base_model"] != model:
        raise ValueError(f"{path} compresses model {info['base_model']!r}, not {model!r}")
    staged = stage_model(net, EMBEDDED_MODELS[model].example())
    return net, staged, (Path(path) / artifact.WEIGHTS_FILE).read_bytes(), artifact.recipe_of(info)


def load_target(model: str, checkpoint: Path | None = None, input_shape: list[int] | None = None,
                weights: Path | None = None, compressed: Path | None = None) -> PlanTarget:
    """Load ``model``: an embedded model (``default``, ``mobilenet_v2_fmnist``: the committed weights and exits),
    a torchvision name (random weights unless
    ``checkpoint``, a safetensors state dict), or ``module:factory`` (a user's model; ``input_shape`` [C, H, W]
    required). ``compressed``: a directory written by ``plan compress`` for the embedded model: that model instead
    of the committed weights (same exits)."""
    if compressed is not None and model not in EMBEDDED_MODELS:
        raise ValueError("--compressed applies to embedded models (plan compress writes them)")
    if model in EMBEDDED_MODELS:
        from partitioner.weights import load_default
        from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD

        side = EMBEDDED_MODELS[model].size
        m, staged, exits, info = load_default(weights, model)
        note = f"committed {model} weights"
        if compressed is not None:
            m, staged, _, recipe = load_compressed_for(compressed, model)
            note = f"{model} compressed ({recipe['method']}, {compressed})"
        spec = InputSpec(shape=[1, side, side], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
                         labels=FASHION_MNIST_CLASSES)
        return PlanTarget(model, m, staged, spec, exits, weights_note=note, info=info,
                          weights_source="committed")
    factory = None
    published = None
    if is_torchvision_model(model):
        published = torchvision_model(model)
        fixed = list(published.input_shape)
        if model.startswith("vit_") and input_shape and list(input_shape) != fixed:
            raise ValueError(f"{model} takes only its published input size {','.join(map(str, fixed))} (a ViT's "
                             f"position embeddings fix the number of patches); got --input-shape "
                             f"{','.join(map(str, input_shape))}")
        with torch.random.fork_rng():  # random weights, but the same ones in every process (a bottleneck
            torch.manual_seed(0)       # trained by one command fits the model another command plans)
            m = build_model(model)
        shape = input_shape or list(published.input_shape)
    elif ":" in model:
        if not input_shape:
            raise ValueError(f"model {model!r} needs --input-shape C,H,W")
        factory = model
        m = _build_factory(model)
        shape = input_shape
    else:
        raise ValueError(unknown_model_message(model, tuple(EMBEDDED_MODELS)))
    if checkpoint is not None:
        _load_checkpoint(m, Path(checkpoint))
    m.eval()
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise ValueError(f"input shape must be C,H,W with positive sizes, got {shape}")
    try:
        staged = stage_model(m, torch.zeros(1, *shape))
    except Exception as exc:
        raise ValueError(f"cannot stage {model!r} on input {shape}: {type(exc).__name__}: {exc}") from exc
    out = staged.boundaries[-1].shape
    num_classes = int(out[0]) if len(out) == 1 else 0
    if num_classes < 1:
        raise ValueError(f"model {model!r} must output a [N, classes] tensor; got per-sample shape {out}")
    c = shape[0]
    if published is not None and c == len(published.mean):
        mean, std = list(published.mean), list(published.std)
    elif c == 3:  # a user's model for RGB input: torchvision's ImageNet normalisation
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    else:
        mean, std = [0.0] * c, [1.0] * c
    labels = list(published.categories) if published is not None else None
    if labels is None or len(labels) != num_classes:
        labels = [f"class_{i}" for i in range(num_classes)]
    spec = InputSpec(shape=list(shape), mean=mean, std=std, labels=labels)
    note = (f"checkpoint {checkpoint}" if checkpoint
            else "random initialisation, seeded (timing only)" if factory is None
            else f"whatever {model} returns (its own weights, or a random initialisation)")
    return PlanTarget(model if factory is None else model.rpartition(":")[2], m, staged, spec, {},
                      factory=factory, weights_note=note,
                      weights_source="checkpoint" if checkpoint else ("random" if factory is None else "unknown"))
