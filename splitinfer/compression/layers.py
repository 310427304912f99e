"""What every compression method shares: the layers it may change, their MACs and stored bytes, predictions of
the teacher, and the one distillation fine-tuning loop.

A *compound leaf* is a module that replaces one convolution or linear layer by several (a low-rank
factorization): it sets ``splitinfer_leaf = True`` and has ``macs(in_shape, out_shape)``. The staged-model cutter
treats it as one call (so a factorized layer adds no boundaries); the staged model counts MACs at the ATen level
(:mod:`splitinfer.macs`), while the per-layer figures here (:func:`layer_macs`) use the modules' own formulas.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn

from splitinfer.staged import module_macs

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def is_compound(module: nn.Module) -> bool:
    """True for a compound leaf (a factorized layer standing for one original layer)."""
    return bool(getattr(module, "splitinfer_leaf", False))


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution and linear layer by qualified name, in definition order (layers inside a compound leaf
    are listed under their own names, e.g. ``2.conv1.0.core``)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[torch.Size, torch.Size]]:
    """(input shape, output shape) of every top-level weight layer or compound leaf, from one forward of
    ``example[:1]`` (layers inside a compound leaf are not listed)."""
    found: dict[str, tuple[torch.Size, torch.Size]] = {}
    hooks = []
    compound_prefixes: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in compound_prefixes):
            continue
        if is_compound(mod):
            compound_prefixes.append(name)
        elif not isinstance(mod, WEIGHT_LAYERS):
            continue

        def hook(m, args, out, name=name):
            found[name] = (args[0].shape, out.shape)

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return found


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs per sample of every top-level weight layer or compound leaf."""
    return {name: module_macs(model.get_submodule(name), out, inp)
            for name, (inp, out) in layer_shapes(model, example).items()}


def state_bytes(model: nn.Module) -> int:
    """Size of the model's state as a float32 safetensors file (the baseline every storage ratio divides)."""
    return len(safetensors_bytes({k: v.detach().contiguous() for k, v in model.state_dict().items()}))


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's logits for ``x`` (eval mode, no grad, batched)."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return float((predict(model, x).argmax(1) == torch.as_tensor(y)).float().mean())


def kl_to(logits: torch.Tensor, reference: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean KL divergence of the reference's softmax to ``logits``' (a distortion measure, nats per sample)."""
    return float(F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(reference / temperature, 1),
                          reduction="batchmean"))


def finetune(student: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
             epochs: float = 1.0, batch_size: int = 128, lr: float = 1e-3, temperature: float = 2.0,
             params: Iterable[nn.Parameter] | None = None, after_step: Callable[[], None] | None = None,
             seed: int = 0, label_weight: float = 0.5) -> dict:
    """THE distillation fine-tuning loop of the compression methods.

    Loss: KL from the teacher's softened outputs (``teacher_logits``, precomputed once for ``x``) times ``T**2``,
    plus ``label_weight`` times cross-entropy when ``labels`` are given. Trains ``params`` (default: every
    parameter that requires grad) with AdamW and a one-cycle schedule; ``after_step`` runs after every optimizer
    step (re-applying a pruning mask, for instance). ``epochs`` may be fractional (a prefix of a shuffled pass).
    Batch norm runs in training mode (its statistics follow the compressed weights); the model is left in eval
    mode.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in (params if params is not None else student.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("nothing to fine-tune: no parameter requires grad")
    n_steps = max(1, round(epochs * len(x) / batch_size))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_steps, pct_start=0.15)
    t0 = time.perf_counter()
    student.train()
    total, seen, step = 0.0, 0, 0
    while step < n_steps:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            if step >= n_steps:
                break
            idx = perm[i : i + batch_size]
            out = student(x[idx])
            loss = F.kl_div(F.log_softmax(out / temperature, 1), F.softmax(teacher_logits[idx] / temperature, 1),
                            reduction="batchmean") * temperature**2
            if labels is not None:
                loss = loss + label_weight * F.cross_entropy(out, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
    student.eval()
    return {"steps": n_steps, "images_seen": seen, "mean_loss": round(total / max(1, seen), 5),
            "seconds": round(time.perf_counter() - t0, 1)}
