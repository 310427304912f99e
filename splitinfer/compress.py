"""Head compression: int8 post-training quantization and structured channel pruning with distillation.

``quantize_int8`` quantizes a module with PyTorch's FX graph mode (x86 backend: fbgemm/oneDNN int8 kernels),
calibrated on a few batches of real inputs; the result takes and returns float tensors.
``int8_head`` does this per segment of a staged head (segments end at exit boundaries and at the split, so
early exits still see float tensors at their boundaries).

``prune_head`` removes output channels of convolutions whose whole dependency group (``torch-pruning``'s
dependency graph: the convolution, its batch norm, the consumers of those channels) lies inside one stage of
the head: boundary tensors keep their shapes, so exits, codecs and the tail are untouched. The pruned head is
then fine-tuned by distillation from the original (feature matching at the split plus output KL).
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from splitinfer.staged import StagedModel, stage_model


def quantize_int8(module: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """An int8 copy of ``module`` (FX post-training static quantization, x86 qconfig), calibrated on
    ``calibration`` batches."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if not calibration:
        raise ValueError("int8 quantization needs at least one calibration batch")
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation on every call
        m = copy.deepcopy(module).eval()
        prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), example_inputs=(calibration[0][:1],))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared).eval()


class SegmentedHead(nn.Module):
    """A head run as consecutive segments (``run(x, start, end)`` between cut boundaries, like a staged model)."""

    def __init__(self, cuts: list[int], segments: list[nn.Module]):
        super().__init__()
        self.cuts = list(cuts)
        self.segments = nn.ModuleList(segments)

    def run(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run from boundary ``start`` to ``end``; both must be cut points."""
        i, j = self.cuts.index(start), self.cuts.index(end)
        for seg in self.segments[i:j]:
            x = seg(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.cuts[0], self.cuts[-1])


def int8_head(staged: StagedModel, split: int, calibration: torch.Tensor, cuts: list[int] | None = None,
              batch: int = 128) -> SegmentedHead:
    """Quantize ``stages[:split]`` to int8, one segment between consecutive ``cuts`` (0 and ``split`` added)."""
    points = sorted({0, split, *(c for c in (cuts or []) if 0 < c < split)})
    segments = []
    x = calibration
    for a, b in zip(points, points[1:], strict=False):
        seg = nn.Sequential(*staged.stages[a:b])
        batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        segments.append(quantize_int8(seg, batches))
        with torch.no_grad():
            x = torch.cat([seg(t.clone()) for t in batches])
    return SegmentedHead(points, segments)


# ---------------------------------------------------------------------------------------------- pruning


def _stage_of_modules(staged: StagedModel) -> dict[str, int]:
    owner = {}
    for info in staged.stage_info:
        for name in info.modules:
            owner[name] = info.index
    return owner


def prune_head(model: nn.Module, example: torch.Tensor, split: int, ratio: float = 0.5) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose head (stages before ``split``) has ``ratio`` of the output channels of every
    stage-internal convolution removed (smallest L1 norm first). Returns the pruned model and a report."""
    import torch_pruning as tp

    if not 0 < ratio < 1:
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
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        # parameter-free ops (ReLU, add) appear as pseudo-modules; the layers around them decide
        names = [name_of[dep.target.module] for dep, _ in group if dep.target.module in name_of]
        stages = {owner.get(n, -1) for n in names}
        if stages != {owner[name]}:
            continue  # these channels cross a stage boundary (or leave the head): keep them
        keep = max(1, round(conv.out_channels * (1 - ratio)))
        importance = conv.weight.detach().abs().flatten(1).sum(1)
        idxs = importance.argsort()[: conv.out_channels - keep].tolist()
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
        group.prune()
        pruned_convs.append({"module": name, "channels_before": keep + len(idxs), "channels_after": keep})
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
