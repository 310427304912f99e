"""One entry point for every compression method: ``compress(model, method, data, options)``.

Each method is a function of a model (its float weights are the teacher) and training data, returning the
compressed model, its structure recipe (layers replaced by factorized ones), its coded layers (weights stored as
symbols into codebooks) and a report. ``plan compress`` and ``bench.compress`` both come through here.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from splitinfer.compression import policy
from splitinfer.compression.coding import CodedTensor
from splitinfer.compression.deep import DeepConfig, deep_compress
from splitinfer.compression.layers import finetune, kl_to, predict, weight_layers
from splitinfer.compression.lowrank import factorize, total_macs
from splitinfer.compression.prune import prune_head, structure_of
from splitinfer.compression.quantize import attach, bake
from splitinfer.staged import stage_model

METHODS = ("deep", "lowrank", "auto", "ternary", "binary", "mixed", "uniform-bits", "prune")


@dataclass
class Data:
    """Training images, the teacher's logits on them, optional labels, and held-out images for sensitivity."""

    x: torch.Tensor
    teacher_logits: torch.Tensor
    labels: torch.Tensor | None
    x_val: torch.Tensor
    sensitivity: dict = field(default_factory=dict)
    """Sensitivities measured so far, by kind (one measurement serves every budget)."""

    @classmethod
    def of(cls, teacher: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, x_val: torch.Tensor) -> Data:
        """Data with the teacher's logits computed once."""
        return cls(x, predict(teacher, x), labels, x_val)


@dataclass
class Options:
    """Method settings. ``budget``: the MAC fraction to keep for lowrank/auto (whole model), the mean bits per
    weight for mixed, the fraction of channels removed for prune (every stage-internal convolution); ``bits``:
    Deep Compression's cluster bits, or uniform-bits' width."""

    epochs: float = 2.0
    budget: float | None = None
    sparsity: float = 0.7
    bits: int = 4
    lr: float = 1e-3
    seed: int = 0
    pow2: bool = False
    keep: float | None = None
    """lowrank: one MAC keep fraction for every layer, given directly (instead of derived from ``budget``)."""


@dataclass
class Compressed:
    """A compressed model, how to rebuild its structure, its coded layers, and what was done."""

    model: nn.Module
    method: str
    structure: list[dict] = field(default_factory=list)
    coded: dict[str, CodedTensor] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def compress(model: nn.Module, example: torch.Tensor, method: str, data: Data, opts: Options = Options()) -> Compressed:
    """Compress a copy of ``model`` with ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose {', '.join(METHODS)}")
    t0 = time.perf_counter()
    m = copy.deepcopy(model).eval()
    full_macs = total_macs(m, example)
    out = Compressed(model=m, method=method)
    rep: dict = {"method": method, "macs_before": full_macs}
    if method == "deep":
        cfg = DeepConfig(sparsity=opts.sparsity, bits=opts.bits, prune_epochs=opts.epochs * 2 / 3,
                         share_epochs=opts.epochs / 3, lr=opts.lr, seed=opts.seed)
        out.model, out.coded, rep["deep"] = deep_compress(m, data.x, data.teacher_logits, data.labels, cfg)
    elif method in ("lowrank", "auto"):
        keep_fraction = opts.budget if opts.budget is not None else 0.5
        if not 0 < keep_fraction < 1:
            raise ValueError(f"--budget for {method} is the fraction of MACs kept, in (0, 1): got {keep_fraction}")
        budget = keep_fraction * full_macs
        if method == "lowrank" and opts.keep is not None:
            if not 0 < opts.keep < 1:
                raise ValueError(f"keep must be in (0, 1), got {opts.keep}")
            keep: float | dict[str, float] = opts.keep
            rep["rule"] = f"one keep fraction {keep} for every layer (given)"
        elif method == "lowrank":
            keep = policy.uniform_keep(m, example, budget)
            rep["rule"] = f"one keep fraction {keep} for every layer (the largest meeting {keep_fraction:.0%} MACs)"
        else:
            if "lowrank" not in data.sensitivity:
                data.sensitivity["lowrank"] = policy.lowrank_sensitivity(m, example, data.x_val)
            sens = data.sensitivity["lowrank"]
            choice, _, predicted = policy.knapsack(sens, budget)
            keep = {n: float(sens.settings[i]) for n, i in choice.items()}
            rep.update(sensitivity=sens.to_json(), predicted_distortion=round(predicted, 6))
        out.structure = factorize(m, example, keep)
        rep["keep"] = keep
        rep["distortion_before_finetune"] = round(kl_to(predict(m, data.x_val), predict(model, data.x_val)), 6)
        rep["finetune"] = finetune(m, data.x, data.teacher_logits, data.labels, epochs=opts.epochs, lr=opts.lr,
                                   seed=opts.seed)
    elif method == "prune":
        ratio = opts.budget if opts.budget is not None else 0.5
        if not 0 < ratio < 1:
            raise ValueError(f"--budget for prune is the fraction of channels removed, in (0, 1): got {ratio}")
        m, rep["prune"] = prune_head(m, example, split=stage_model(m, example).num_stages, ratio=ratio)
        out.structure = structure_of(rep["prune"])
        rep["finetune"] = finetune(m, data.x, data.teacher_logits, data.labels, epochs=opts.epochs, lr=opts.lr,
                                   seed=opts.seed)
    elif method in ("ternary", "binary", "mixed", "uniform-bits"):
        bits = None
        if method == "uniform-bits":
            bits = {n: opts.bits for n, _ in weight_layers(m)}
        elif method == "mixed":
            mean_bits = opts.budget if opts.budget is not None else 4.0
            if "bits" not in data.sensitivity:
                data.sensitivity["bits"] = policy.bits_sensitivity(m, data.x_val)
            sens = data.sensitivity["bits"]
            n_weights = sum(mod.weight.numel() for _, mod in weight_layers(m))
            choice, cost, predicted = policy.knapsack(sens, mean_bits * n_weights)
            bits = {n: int(sens.settings[i]) for n, i in choice.items()}
            rep.update(bits=bits, mean_bits=round(cost / n_weights, 3), predicted_distortion=round(predicted, 6),
                       sensitivity=sens.to_json())
        quantizers = attach(m, "uniform" if bits is not None else method, bits=bits, pow2=opts.pow2)
        rep["quantized_layers"] = sorted(quantizers)
        rep["full_precision_layers"] = sorted(n for n, _ in weight_layers(m) if n not in quantizers)
        rep["finetune"] = finetune(m, data.x, data.teacher_logits, data.labels, epochs=opts.epochs, lr=opts.lr,
                                   seed=opts.seed)
        out.coded = bake(m, quantizers)
    out.model = m.eval()
    rep["macs_after"] = total_macs(out.model, example)
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    out.report = rep
    return out
