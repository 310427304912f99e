"""Structured pruning of a head: stage-internal output channels, one ratio or a ratio per layer, then
distillation.

``prune_head`` removes output channels of convolutions whose whole dependency group (``torch-pruning``'s
dependency graph: the convolution, its batch norm, the consumers of those channels) lies inside one stage of
the head: boundary tensors keep their shapes, so exits, codecs and the tail are untouched. The pruned head is
then fine-tuned by distillation from the original (feature matching at the split plus output KL).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from splitinfer.staged import StagedModel, stage_model


def _stage_of_modules(staged: StagedModel) -> dict[str, int]:
    owner = {}
    for info in staged.stage_info:
        for name in info.modules:
            owner[name] = info.index
    return owner


def prune_head(model: nn.Module, example: torch.Tensor, split: int,
               ratio: float | dict[str, float] = 0.5) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose head (stages before ``split``) has ``ratio`` of the output channels of every
    stage-internal convolution removed (smallest L1 norm first); ``ratio`` may be one value or one per
    convolution name (a name absent, or at 0, is not pruned). Returns the pruned model and a report."""
    import torch_pruning as tp

    ratios = ratio.values() if isinstance(ratio, dict) else [ratio]
    if any(not 0 <= r < 1 for r in ratios) or (not isinstance(ratio, dict) and ratio == 0):
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    pruned = copy.deepcopy(model).eval()
    staged = stage_model(pruned, example)
    owner = _stage_of_modules(staged)
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    name_of = {m: n for n, m in pruned.named_modules()}
    pruned_convs = []
    for name, conv in list(pruned.named_modules()):
        if not isinstance(conv, nn.Conv2d) or owner.get(name, split) >= split or conv.groups != 1:
            continue
        layer_ratio = ratio.get(name, 0.0) if isinstance(ratio, dict) else ratio
        if layer_ratio <= 0:
            continue
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        # parameter-free ops (ReLU, add) appear as pseudo-modules; the layers around them decide
        names = [name_of[dep.target.module] for dep, _ in group if dep.target.module in name_of]
        stages = {owner.get(n, -1) for n in names}
        if stages != {owner[name]}:
            continue  # these channels cross a stage boundary (or leave the head): keep them
        keep = max(1, round(conv.out_channels * (1 - layer_ratio)))
        importance = conv.weight.detach().abs().flatten(1).sum(1)
        idxs = sorted(importance.argsort()[: conv.out_channels - keep].tolist())
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
        group.prune()
        pruned_convs.append({"module": name, "channels_before": keep + len(idxs), "channels_after": keep,
                             "removed": idxs})
    after = stage_model(pruned, example)
    before_macs = staged.macs_between(0, split)
    report = {"split": split, "ratio": ratio, "pruned": pruned_convs,
              "head_macs_before": int(before_macs), "head_macs_after": int(after.macs_between(0, split)),
              "params_before": sum(p.numel() for p in model.parameters()),
              "params_after": sum(p.numel() for p in pruned.parameters())}
    report["mac_reduction"] = round(1 - report["head_macs_after"] / max(1, before_macs), 4)
    if [b.shape for b in after.boundaries] != [b.shape for b in staged.boundaries]:
        raise RuntimeError("internal error: pruning changed a boundary shape")
    return pruned, report


def distill_head(student: StagedModel, teacher: StagedModel, split: int, x: torch.Tensor, epochs: int = 2,
                 batch_size: int = 128, lr: float = 2e-3, temperature: float = 2.0, seed: int = 0) -> dict:
    """Fine-tune the student's head (stages before ``split``) to reproduce the teacher's features at ``split``
    and its outputs (the tail is shared in shape and frozen). No labels."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = student.num_stages
    head_params = [p for s in student.stages[:split] for p in s.parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in head_params:
        p.requires_grad_(True)
    teacher.eval()
    opt = torch.optim.AdamW(head_params, lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        student.eval()
        for s in student.stages[:split]:
            s.train()
        total = 0.0
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            xb = x[perm[i : i + batch_size]]
            with torch.no_grad():
                t_feat = teacher.run(xb, 0, split).clone()
                t_out = teacher.run(t_feat.clone(), split, n)
            s_feat = student.run(xb, 0, split)
            s_out = student.run(s_feat.clone(), split, n)
            loss = F.mse_loss(s_feat, t_feat) / (t_feat.pow(2).mean() + 1e-8) + F.kl_div(
                F.log_softmax(s_out / temperature, 1), F.softmax(t_out / temperature, 1),
                reduction="batchmean") * temperature**2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xb)
        history.append({"epoch": epoch + 1, "loss": round(total / len(x), 5)})
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return {"epochs": epochs, "train_images": len(x), "seconds": round(time.perf_counter() - t0, 1),
            "history": history}


def structure_of(report: dict) -> list[dict]:
    """The structure recipe entries of a :func:`prune_head` report (what :func:`replay` rebuilds)."""
    return [{"layer": p["module"], "kind": "prune", "removed": list(p["removed"])} for p in report["pruned"]]


def replay(model: nn.Module, example: torch.Tensor, entries: list[dict]) -> nn.Module:
    """Remove the recorded output channels from a fresh ``model`` in place, in the recorded order (the same
    dependency groups as when they were chosen): the pruned architecture, ready for its state dict."""
    import torch_pruning as tp

    if not entries:
        return model
    with torch.inference_mode(False), torch.enable_grad():  # the dependency graph traces with autograd
        return _replay(model, example, entries, tp)


def _replay(model: nn.Module, example: torch.Tensor, entries: list[dict], tp) -> nn.Module:
    dg = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example.clone())
    for e in entries:
        try:
            conv = model.get_submodule(e["layer"])
            removed = sorted({int(i) for i in e["removed"]})
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"prune entry {e!r} does not fit the model: {exc}") from None
        if not isinstance(conv, nn.Conv2d) or not removed or removed[0] < 0 or removed[-1] >= conv.out_channels \
                or len(removed) >= conv.out_channels:
            raise ValueError(f"prune entry for {e['layer']} does not fit the model")
        dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=removed).prune()
    return model

