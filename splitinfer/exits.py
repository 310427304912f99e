"""Early exits: small classifiers attached at boundaries, trained by distillation from the final logits.

Training keeps the backbone frozen: every batch runs the staged model once (no gradients), collects the
boundary tensors and final logits, and fits every exit head to the final softmax (KL divergence).
Thresholds on the max-softmax confidence are then picked on a validation split so that the agreement
of the whole system (exits + full model) with the full model drops by at most a given budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from splitinfer.staged import StagedModel


class ExitHead(nn.Module):
    """Conv 3x3 (stride 2 on large maps) + BN + ReLU, global average pool, linear."""

    def __init__(self, in_shape: list[int], num_classes: int, hidden: int = 64):
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"exit heads attach to [C, H, W] boundaries, not {in_shape}")
        c, h, _ = in_shape
        stride = 2 if h > 8 else 1
        self.body = nn.Sequential(
            nn.Conv2d(c, hidden, 3, stride, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes),
        )
        self.in_shape = list(in_shape)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def macs(self) -> int:
        """Multiply-accumulates per sample."""
        c, h, w = self.in_shape
        conv = self.body[0]
        oh, ow = (h + 1) // conv.stride[0], (w + 1) // conv.stride[1]
        lin = self.body[5]
        return oh * ow * self.hidden * c * 9 + lin.in_features * lin.out_features


def collect(staged: StagedModel, x: torch.Tensor,
            boundaries: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Run the full staged model once; return the tensors at ``boundaries`` and the final logits."""
    feats: dict[int, torch.Tensor] = {}
    h = x
    for k in range(staged.num_stages):
        if k in boundaries:
            feats[k] = h
        h = staged.stages[k](h)
    return feats, h


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
    bar = tqdm(total=steps, desc="exit heads", disable=not progress, leave=False)
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


@torch.no_grad()
def exit_outputs(staged: StagedModel, heads: dict[int, ExitHead], x: torch.Tensor, batch: int = 1000):
    """Per exit: (confidence, prediction) arrays; plus the full model's predictions and logits."""
    conf = {b: [] for b in heads}
    pred = {b: [] for b in heads}
    full = []
    for i in range(0, len(x), batch):
        feats, logits = collect(staged, x[i : i + batch], list(heads))
        full.append(logits.argmax(1))
        for b, head in heads.items():
            p = F.softmax(head(feats[b]), dim=1)
            c, y = p.max(1)
            conf[b].append(c)
            pred[b].append(y)
    return ({b: torch.cat(conf[b]).numpy() for b in heads}, {b: torch.cat(pred[b]).numpy() for b in heads},
            torch.cat(full).numpy())


@dataclass
class ExitDecision:
    """The outcome of a threshold choice on a sample set."""

    thresholds: dict[int, float]
    exit_rates: dict[int, float]
    agreement: float


def simulate(thresholds: dict[int, float], conf: dict[int, np.ndarray], pred: dict[int, np.ndarray],
             full_pred: np.ndarray) -> ExitDecision:
    """Apply thresholds in boundary order; the first exit whose confidence >= threshold answers."""
    n = len(full_pred)
    answered = np.zeros(n, dtype=bool)
    answer = full_pred.copy()
    rates = {}
    for b in sorted(thresholds):
        take = (~answered) & (conf[b] >= thresholds[b])
        answer[take] = pred[b][take]
        answered |= take
        rates[b] = float(take.mean()) if n else 0.0
    return ExitDecision(dict(thresholds), rates, float((answer == full_pred).mean()) if n else 1.0)


def choose_thresholds(conf: dict[int, np.ndarray], pred: dict[int, np.ndarray], full_pred: np.ndarray,
                      max_agreement_drop: float = 0.01) -> ExitDecision:
    """Greedy max-softmax thresholds: earliest exit first, each lowered as far as the shared budget allows.

    Each exit gets an equal share of the disagreement budget (a fraction of the sample count); a threshold
    is the lowest candidate whose extra disagreements stay within the exit's share plus what earlier exits
    left unused. Empirical (no finite-sample guarantee); see the calibrated mode of later work.
    """
    n = len(full_pred)
    order = sorted(conf)
    budget = max_agreement_drop * n
    share = budget / max(1, len(order))
    answered = np.zeros(n, dtype=bool)
    used = 0.0
    thresholds: dict[int, float] = {}
    for i, b in enumerate(order):
        allowed = share * (i + 1) - used
        candidates = np.unique(np.concatenate([np.linspace(0.3, 1.0, 141), [1.01]]))
        chosen = 1.01  # above any softmax value: the exit never fires
        for t in sorted(candidates):
            take = (~answered) & (conf[b] >= t)
            wrong = int((pred[b][take] != full_pred[take]).sum())
            if wrong <= allowed:
                chosen = float(t)
                break
        take = (~answered) & (conf[b] >= chosen)
        used += int((pred[b][take] != full_pred[take]).sum())
        answered |= take
        thresholds[b] = chosen
    return simulate(thresholds, conf, pred, full_pred)
