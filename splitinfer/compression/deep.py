"""Deep Compression (Han, Mao and Dally, ICLR 2016) of the weights a bundle ships.

1. **Pruning**: in every convolution and linear layer with at least ``min_prune_weights`` weights, the
   ``sparsity`` fraction of smallest-magnitude weights is set to zero (per layer), and the network is
   retrained by distillation with the mask held (pruned weights stay exactly 0).
2. **Trained weight sharing**: the surviving weights of each layer are clustered by k-means (``2**bits - 1``
   centroids, linear initialisation over the weights' range, as the paper found best) and every weight
   becomes a symbol: 0 for a pruned weight, ``1..K`` for its cluster. The centroids are then fine-tuned (the
   gradient of a centroid is the sum of its members' gradients), the symbols stay fixed.
3. **Entropy coding**: symbols (cluster indices and sparse positions together) are ANS coded per layer with
   the layer's own frequencies (:mod:`splitinfer.compression.coding`); batch norm and biases stay float32.

The model that is evaluated runs on ``codebook[symbol]`` exactly as decoded from the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from splitinfer.compression.coding import CodedTensor, shared_weight
from splitinfer.compression.layers import finetune, weight_layers


@dataclass
class DeepConfig:
    """Settings of Deep Compression (see the module docstring)."""

    sparsity: float = 0.7
    bits: int = 4
    min_prune_weights: int = 1000
    prune_epochs: float = 2.0
    share_epochs: float = 1.0
    kmeans_iters: int = 30
    lr: float = 1e-3
    seed: int = 0


def magnitude_masks(model: nn.Module, sparsity: float, min_weights: int) -> dict[str, torch.Tensor]:
    """Per layer (at least ``min_weights`` weights), a mask keeping the ``1 - sparsity`` largest magnitudes."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    masks = {}
    for name, mod in weight_layers(model):
        w = mod.weight.detach()
        if w.numel() < min_weights or sparsity == 0:
            continue
        k = int(round(sparsity * w.numel()))
        if k < 1:
            continue
        threshold = w.abs().flatten().kthvalue(k).values
        masks[name] = (w.abs() > threshold).to(w.dtype)
    return masks


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a 1-D float tensor with centroids initialised linearly over its range.
    Returns (centroids [k], assignment per value)."""
    lo, hi = float(values.min()), float(values.max())
    centroids = torch.linspace(lo, hi, k, dtype=torch.float32)
    assign = torch.zeros(len(values), dtype=torch.long)
    for _ in range(iters):
        assign = (values[:, None] - centroids[None, :]).abs().argmin(1)
        sums = torch.zeros(k).index_add_(0, assign, values)
        counts = torch.bincount(assign, minlength=k).float()
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids, assign


class SharedWeight(nn.Module):
    """Parametrization: the weight is ``codebook[symbol]`` (codebook entry 0 is pinned at 0 for pruned weights);
    the codebook's non-zero entries are trained."""

    def __init__(self, symbols: torch.Tensor, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("symbols", symbols)
        self.centroids = nn.Parameter(centroids.clone())

    def codebook(self) -> torch.Tensor:
        """float32 ``[1, K + 1]``: 0 for pruned weights, then the centroids."""
        return torch.cat([torch.zeros(1), self.centroids]).unsqueeze(0)

    def forward(self, _latent: torch.Tensor) -> torch.Tensor:
        return shared_weight(self.symbols, self.codebook())


def deep_compress(model: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor,
                  labels: torch.Tensor | None = None, cfg: DeepConfig = DeepConfig()
                  ) -> tuple[nn.Module, dict[str, CodedTensor], dict]:
    """Prune, retrain, share and fine-tune ``model`` in place. Returns the model (every pruned/shared layer's
    weight is a plain tensor equal to its codebook values), the coded layers by parameter name
    (``<layer>.weight``) and a report."""
    if not 1 <= cfg.bits <= 8:
        raise ValueError(f"bits must be 1..8, got {cfg.bits}")
    layers = dict(weight_layers(model))
    masks = magnitude_masks(model, cfg.sparsity, cfg.min_prune_weights)
    with torch.no_grad():
        for name, m in masks.items():
            layers[name].weight.mul_(m)

    def reapply() -> None:
        for name, m in masks.items():
            layers[name].weight.mul_(m)

    prune_fit = finetune(model, x, teacher_logits, labels, epochs=cfg.prune_epochs, lr=cfg.lr,
                         after_step=reapply, seed=cfg.seed) if cfg.prune_epochs > 0 and masks else None

    k = (1 << cfg.bits) - 1
    clusters = {}
    for name, mod in layers.items():
        w = mod.weight.detach().flatten()
        keep = w != 0
        centroids, assign = kmeans_1d(w[keep], min(k, int(keep.sum())), cfg.kmeans_iters)
        if len(centroids) < k:
            centroids = torch.cat([centroids, torch.zeros(k - len(centroids))])
        symbols = torch.zeros_like(w, dtype=torch.long)
        symbols[keep] = assign + 1
        clusters[name] = SharedWeight(symbols.reshape(mod.weight.shape), centroids)
        parametrize.register_parametrization(mod, "weight", clusters[name], unsafe=True)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [c.centroids for c in clusters.values()]
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
            trainable += [mod.weight, mod.bias]
        elif isinstance(mod, nn.Conv2d | nn.Linear) and mod.bias is not None:
            trainable.append(mod.bias)
    for p in trainable:
        p.requires_grad_(True)
    share_fit = finetune(model, x, teacher_logits, labels, epochs=cfg.share_epochs, lr=cfg.lr / 2,
                         params=trainable, seed=cfg.seed + 1) if cfg.share_epochs > 0 else None
    coded: dict[str, CodedTensor] = {}
    with torch.no_grad():
        for name, mod in layers.items():
            c = clusters[name]
            book = c.codebook().detach().clone()
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            mod.weight = nn.Parameter(shared_weight(c.symbols, book), requires_grad=False)
            coded[f"{name}.weight"] = CodedTensor(c.symbols.clone(), book, cfg.bits)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    n = sum(int(c.symbols.numel()) for c in coded.values())
    zeros = sum(int((c.symbols == 0).sum()) for c in coded.values())
    report = {"config": asdict(cfg), "layers": len(coded), "pruned_layers": len(masks),
              "weights": n, "zero_weights": zeros, "sparsity": round(zeros / max(1, n), 4),
              "prune_finetune": prune_fit, "share_finetune": share_fit}
    return model, coded, report
