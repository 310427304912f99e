"""Early exits: small classifiers attached at boundaries, trained by distillation from the final logits.

Training keeps the backbone frozen: every batch runs the staged model once (no gradients), collects the
boundary tensors and final logits, and fits every exit head to the final softmax (KL divergence).
Thresholds are chosen by :mod:`splitinfer.calibration` (certified or empirical).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitinfer.head import walk
from splitinfer.progress import progress_bar
from splitinfer.staged import StagedModel
from splitinfer.torch_head import TorchStages


class TokenPool(nn.Module):
    """``[N, L, D]`` tokens -> ``[N, 2D]``: layer norm, then the first token (a ViT's class token) beside the mean
    of all tokens (what the class token has not gathered yet at an early block, the patch tokens still hold)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return torch.cat([x[:, 0], x.mean(dim=1)], dim=1)


class ExitHead(nn.Module):
    """An exit classifier for a boundary's features.

    ``[C, H, W]`` maps: average-pool large maps down to at most 7x7, conv 3x3 + BN + ReLU, global average pool,
    linear. Pooling first keeps an exit cheap (a few percent of the default model's MACs) even at 28x28
    boundaries. ``[L, D]`` token sequences (a transformer between blocks): :class:`TokenPool` (class token and
    mean token, layer-normed), linear to ``hidden`` + GELU, linear.
    """

    def __init__(self, in_shape: list[int], num_classes: int, hidden: int = 32):
        super().__init__()
        self.in_shape = list(in_shape)
        self.hidden = hidden
        if len(in_shape) == 2:
            dim = in_shape[1]
            self.pool_factor = 1
            self.body = nn.Sequential(TokenPool(dim), nn.Linear(2 * dim, hidden), nn.GELU(),
                                      nn.Linear(hidden, num_classes))
            return
        if len(in_shape) != 3:
            raise ValueError(f"exit heads attach to [C, H, W] maps or [L, D] token sequences, not {in_shape}")
        c, h, w = in_shape
        self.pool_factor = max(1, min(h, w) // 7)
        self.body = nn.Sequential(
            nn.AvgPool2d(self.pool_factor) if self.pool_factor > 1 else nn.Identity(),
            nn.Conv2d(c, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def macs(self) -> int:
        """Multiply-accumulates per sample (convolution and linear layers)."""
        if len(self.in_shape) == 2:
            first, last = self.body[1], self.body[3]
            return first.in_features * first.out_features + last.in_features * last.out_features
        c, h, w = self.in_shape
        oh, ow = h // self.pool_factor, w // self.pool_factor
        lin = self.body[6]
        return oh * ow * self.hidden * c * 9 + lin.in_features * lin.out_features


def collect(staged: StagedModel, x: torch.Tensor,
            boundaries: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Run the full staged model once (:func:`splitinfer.head.walk`); return the tensors at ``boundaries``
    and the final logits."""
    n = staged.num_stages
    feats: dict[int, torch.Tensor] = {0: x.clone()} if 0 in boundaries else {}
    logits = x
    for step in walk(TorchStages(staged), x, n, points=boundaries):
        if step.boundary == n:
            logits = step.tensor
        else:  # a boundary in ``boundaries``
            feats[step.boundary] = step.tensor.clone()  # the next stage may start with an in-place activation
    return feats, logits


def train_exits(staged: StagedModel, boundaries: list[int], x: torch.Tensor, num_classes: int, epochs: int = 3,
                batch_size: int = 256, lr: float = 3e-3, temperature: float = 2.0, seed: int = 0,
                progress: bool = True) -> dict[int, ExitHead]:
    """Train one exit head per boundary by distillation from the (frozen) full model's logits."""
    torch.manual_seed(seed)
    staged.eval()
    heads = {b: ExitHead(staged.boundaries[b].shape, num_classes) for b in boundaries}
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    bar = progress_bar(total=steps, desc="exit heads", enabled=progress, leave=False)
    for _ in range(epochs):
        for h in heads.values():
            h.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            xb = x[perm[i : i + batch_size]]
            with torch.no_grad():
                feats, logits = collect(staged, xb, boundaries)
                target = F.softmax(logits / temperature, dim=1)
            loss = sum(
                F.kl_div(F.log_softmax(heads[b](feats[b]) / temperature, dim=1), target, reduction="batchmean")
                for b in boundaries
            ) * temperature**2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    for h in heads.values():
        h.eval()
    return heads
