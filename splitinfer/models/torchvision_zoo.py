"""Every torchvision classification model by name, with its published input size, normalisation, class names,
parameter count and MACs read from its weights' metadata (the installed package's; nothing is downloaded: the
weights themselves stay random unless a checkpoint is given).

A model is built the way torchvision builds it for its default weights, so that a checkpoint of those weights
fits and the published figures apply: a vision transformer for its weights' image size (``vit_h_14``: 518), and
GoogLeNet / Inception v3 with ``transform_input`` on (and GoogLeNet without its training-only auxiliary heads).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

from torch import nn


@dataclass(frozen=True)
class TorchvisionModel:
    """What torchvision publishes about a model's default weights."""

    name: str
    input_shape: tuple[int, int, int]  # C, H, W: the crop the default weights were evaluated at
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: tuple[str, ...]
    num_params: int
    gmacs: float  # torchvision's ``_ops``: multiply-accumulates (billions) per image at ``input_shape``
    weights: str  # the default weights' enum name, e.g. ``ResNet50_Weights.IMAGENET1K_V2``


def _vision():
    try:
        import torchvision.models as tvm
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("torchvision models need torchvision: pip install 'splitinfer[vision]'") from exc
    return tvm


@cache
def torchvision_names() -> tuple[str, ...]:
    """Names of every classification model in ``torchvision.models`` (empty when torchvision is missing)."""
    try:
        tvm = _vision()
    except ImportError:
        return ()
    return tuple(tvm.list_models(module=tvm))


def is_torchvision_model(name: str) -> bool:
    """True when ``name`` is a torchvision classification model."""
    return name in torchvision_names()


@cache
def torchvision_model(name: str) -> TorchvisionModel:
    """The published facts of ``name``'s default weights; ValueError for an unknown name (with suggestions)."""
    if not is_torchvision_model(name):
        raise ValueError(unknown_model_message(name, ()))
    tvm = _vision()
    weights = tvm.get_model_weights(name).DEFAULT
    preset = weights.transforms()
    crop = int(preset.crop_size[0])
    meta = weights.meta
    return TorchvisionModel(name=name, input_shape=(3, crop, crop), mean=tuple(float(v) for v in preset.mean),
                            std=tuple(float(v) for v in preset.std), categories=tuple(meta.get("categories") or ()),
                            num_params=int(meta["num_params"]), gmacs=float(meta["_ops"]),
                            weights=f"{type(weights).__name__}.{weights.name}")


def _build_kwargs(name: str) -> dict:
    """The constructor arguments torchvision's builder sets when it loads ``name``'s default weights."""
    if name.startswith("vit_"):
        return {"image_size": torchvision_model(name).input_shape[1]}
    if name == "googlenet":
        return {"transform_input": True, "aux_logits": False, "init_weights": True}
    if name == "inception_v3":
        return {"transform_input": True, "init_weights": True}
    return {}


def build_torchvision(name: str, num_classes: int | None = None) -> nn.Module:
    """An untrained ``name`` (eval mode) shaped as for its default weights; ``num_classes`` replaces the 1000."""
    if not is_torchvision_model(name):
        raise ValueError(unknown_model_message(name, ()))
    kwargs = _build_kwargs(name)
    if num_classes is not None and num_classes != 1000:
        kwargs["num_classes"] = num_classes
    return _vision().get_model(name, weights=None, **kwargs).eval()


def unknown_model_message(name: str, embedded: tuple[str, ...]) -> str:
    """The error for a model name nobody knows: the close matches, and where the full list is."""
    known = [*embedded, *torchvision_names()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    choices = [f"an embedded model ({', '.join(embedded)})"] if embedded else []
    if torchvision_names():
        choices.append(f"any of the {len(torchvision_names())} torchvision classification models by name "
                       "(`splitinfer plan models` lists them, e.g. resnet34, vit_b_16, swin_t)")
    else:
        choices.append("a torchvision model by name once torchvision is installed (pip install 'splitinfer[vision]')")
    return f"unknown model {name!r}{hint}. Choose {', '.join(choices)}, or package.module:function"
