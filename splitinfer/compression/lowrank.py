"""Low-rank factorization of convolutions (Tucker-2) and linear layers (truncated SVD).

A ``k x k`` convolution ``W [O, I, k, k]`` becomes three (Kim et al., ICLR 2016, Tucker-2 by HOSVD): a 1x1
convolution ``I -> R_in`` (the leading left singular vectors of W unfolded along its input mode), the ``k x k``
core ``R_in -> R_out`` (with the original stride, padding and dilation), and a 1x1 convolution ``R_out -> O``
(the output mode's singular vectors, and the bias). A linear layer ``W [O, I]`` becomes ``I -> R -> O`` from
its truncated SVD. The result is a *compound leaf* (:mod:`splitinfer.compression.layers`): the staged model
sees one call, so boundaries, exits and codecs are unchanged, and MACs are counted for the three parts.

**Rank rule** (per layer): given the fraction ``keep`` of the layer's MACs it may keep, the ranks are the
largest with the same fraction of input and output channels (``R_in / I == R_out / O``, rounded to a multiple
of 4 where the layer has at least 16 channels) whose factorized MACs are at most ``keep`` times the original.
A layer that no rank makes cheaper is left as it is, and so are convolutions with fewer than 4 input channels
(a grey or RGB stem: its filters span at most 9-27 dimensions, there is nothing low-rank to remove) and layers
with less than 1 % of the model's MACs (they cannot pay). The per-layer ``keep`` is uniform or chosen by the
automated policy (:mod:`splitinfer.compression.policy`). Depthwise/grouped convolutions are not factorized.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from splitinfer.compression.layers import layer_macs, layer_shapes

MIN_MAC_SHARE = 0.01
MIN_IN_CHANNELS = 4


class Tucker2Conv(nn.Module):
    """A convolution as 1x1 (I -> R_in), k x k core (R_in -> R_out), 1x1 (R_out -> O): one staged call."""

    splitinfer_leaf = True

    def __init__(self, conv: nn.Conv2d, r_in: int, r_out: int):
        super().__init__()
        self.ranks = (int(r_in), int(r_out))
        self.first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False)
        self.core = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                              padding_mode=conv.padding_mode)
        self.last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def macs(self, in_shape, out_shape) -> int:
        """MACs per sample of the three convolutions."""
        hin = int(in_shape[-2] * in_shape[-1]) if in_shape is not None else 0
        hout = int(out_shape[-2] * out_shape[-1])
        k = math.prod(self.core.kernel_size)
        r_in, r_out = self.ranks
        return hin * self.first.in_channels * r_in + hout * (r_in * r_out * k + r_out * self.last.out_channels)


class LowRankLinear(nn.Module):
    """A linear layer as ``I -> R -> O`` (truncated SVD): one staged call."""

    splitinfer_leaf = True

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.ranks = (int(rank),)
        self.first = nn.Linear(linear.in_features, rank, bias=False)
        self.last = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    def macs(self, in_shape, out_shape) -> int:
        """MACs per sample of the two products."""
        rows = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
        return rows * self.ranks[0] * (self.first.in_features + self.last.out_features)


def _leading(mat: torch.Tensor, r: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(mat, full_matrices=False)
    return u[:, :r]


def tucker2(conv: nn.Conv2d, r_in: int, r_out: int) -> Tucker2Conv:
    """The Tucker-2 factorization of ``conv`` at ranks (R_in, R_out), weights from the HOSVD."""
    w = conv.weight.detach().double()
    o, i, kh, kw = w.shape
    u_out = _leading(w.reshape(o, -1), r_out)  # [O, R_out]
    u_in = _leading(w.transpose(0, 1).reshape(i, -1), r_in)  # [I, R_in]
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)  # [R_out, R_in, k, k]
    f = Tucker2Conv(conv, r_in, r_out)
    with torch.no_grad():
        f.first.weight.copy_(u_in.t().reshape(r_in, i, 1, 1))
        f.core.weight.copy_(core)
        f.last.weight.copy_(u_out.reshape(o, r_out, 1, 1))
        if conv.bias is not None:
            f.last.bias.copy_(conv.bias.detach())
    return f.float()


def svd_linear(linear: nn.Linear, rank: int) -> LowRankLinear:
    """The truncated-SVD factorization of ``linear`` at ``rank``."""
    u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    f = LowRankLinear(linear, rank)
    root = s[:rank].sqrt()
    with torch.no_grad():
        f.first.weight.copy_(root[:, None] * vh[:rank])
        f.last.weight.copy_(u[:, :rank] * root[None, :])
        if linear.bias is not None:
            f.last.bias.copy_(linear.bias.detach())
    return f.float()


def _round(r: float, full: int) -> int:
    r = max(1, min(full, int(r)))
    return max(4, r // 4 * 4) if full >= 16 and r >= 4 else r


def ranks_for(layer: nn.Module, in_hw: int, out_hw: int, keep: float) -> tuple[int, ...] | None:
    """The rank rule (module docstring): ranks for ``layer`` keeping at most ``keep`` of its MACs, or None
    when no factorization is cheaper."""
    if keep >= 1:
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.in_channels < MIN_IN_CHANNELS:
            return None
        o, i = layer.out_channels, layer.in_channels
        k = math.prod(layer.kernel_size)
        orig = out_hw * o * i * k
        best = None
        for step in range(1, 1000):
            frac = step / 1000
            r_in, r_out = _round(frac * i, i), _round(frac * o, o)
            cost = in_hw * i * r_in + out_hw * (r_in * r_out * k + r_out * o)
            if cost <= keep * orig:
                best = (r_in, r_out)
            elif frac * min(i, o) >= 1:
                break
        return best
    if isinstance(layer, nn.Linear):
        o, i = layer.out_features, layer.in_features
        r = int(keep * o * i / (o + i))
        return (r,) if r >= 1 else None
    return None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)




def factorize(model: nn.Module, example: torch.Tensor, keep: float | dict[str, float],
              layers: list[str] | None = None, min_mac_share: float = MIN_MAC_SHARE) -> list[dict]:
    """Factorize ``model``'s layers in place by the rank rule: ``keep`` is the MAC fraction per layer (one value
    for all, or per layer name; a missing name keeps the layer). Layers holding less than ``min_mac_share`` of
    the model's MACs are left alone (they cannot pay: the default model's 96 -> 10 classifier, resnet50's fc).
    Returns the structure recipe: one entry per factorized layer (``{"layer", "kind", "ranks"}``), what
    :func:`apply_structure` rebuilds."""
    shapes = {n: (math.prod(a[2:]) if len(a) > 2 else 1, math.prod(b[2:]) if len(b) > 2 else 1)
              for n, (a, b) in layer_shapes(model, example).items()}
    macs = layer_macs(model, example)
    total = sum(macs.values())
    recipe = []
    for name, mod in list(model.named_modules()):
        if name not in shapes or (layers is not None and name not in layers):
            continue
        if macs.get(name, 0) < min_mac_share * total:
            continue
        k = keep if isinstance(keep, float | int) else keep.get(name, 1.0)
        ranks = ranks_for(mod, *shapes[name], float(k))
        if ranks is None:
            continue
        if isinstance(mod, nn.Conv2d):
            _set(model, name, tucker2(mod, ranks[0], ranks[1]))
            recipe.append({"layer": name, "kind": "tucker2", "ranks": list(ranks)})
        else:
            _set(model, name, svd_linear(mod, ranks[0]))
            recipe.append({"layer": name, "kind": "svd", "ranks": list(ranks)})
    return recipe


def apply_structure(model: nn.Module, recipe: list[dict]) -> nn.Module:
    """Rebuild factorized layers (shapes only; weights come from the state dict) from a structure recipe."""
    for entry in recipe:
        name, kind, ranks = entry["layer"], entry["kind"], [int(r) for r in entry["ranks"]]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"structure recipe names layer {name!r}, which the model does not have") from None
        if kind == "tucker2" and isinstance(mod, nn.Conv2d) and len(ranks) == 2 and min(ranks) >= 1:
            _set(model, name, Tucker2Conv(mod, ranks[0], ranks[1]))
        elif kind == "svd" and isinstance(mod, nn.Linear) and len(ranks) == 1 and ranks[0] >= 1:
            _set(model, name, LowRankLinear(mod, ranks[0]))
        else:
            raise ValueError(f"structure recipe entry {entry!r} does not fit layer {name} ({type(mod).__name__})")
    return model


def total_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs per sample of every weight layer and compound leaf."""
    return sum(layer_macs(model, example).values())
