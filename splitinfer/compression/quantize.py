"""Few-bit weights: ternary (TTQ), binary (XNOR-style) and uniform b-bit per layer (mixed precision).

All three train a latent float weight through a straight-through estimator (STE) while the forward pass uses
the quantized one, by distillation from the full-precision model, then store every quantized layer as symbols
into a codebook (:mod:`splitinfer.compression.coding`):

* **Ternary** (Zhu et al., *Trained Ternary Quantization*, ICLR 2017): ``w_t = +W_p`` where ``w > Δ``,
  ``-W_n`` where ``w < -Δ``, else 0, with **threshold rule** ``Δ = t · max|w|`` per layer (``t = 0.05``, the
  paper's) and two learned scales per layer (``W_p``, ``W_n``, initialised to the mean magnitude of the
  weights beyond the threshold on each side). 2-bit symbols, one codebook ``[0, W_p, -W_n, 0]`` per layer.
* **Binary** (Rastegari et al., XNOR-Net weights): ``w_b = α_c · sign(w)`` with ``α_c`` the mean magnitude of
  output channel ``c`` (recomputed from the latent weight, not learned); STE clipped at ``|w| <= 1``.
  1-bit symbols, a codebook ``[-α_c, α_c]`` per output channel.
* **Uniform b bits** (b in 2..8): symmetric per output channel, ``2**(b-1) - 1`` levels each side,
  ``scale_c = max|w_c| / (2**(b-1) - 1)``; with ``pow2=True`` the scale is rounded up to a power of two
  (dynamic fixed point: a per-channel binary point). A per-layer choice of b is mixed precision
  (:mod:`splitinfer.compression.policy` chooses it).

The first and last weight layers stay in full precision for ternary and binary (the usual practice in those
papers: the stem has few weights and the classifier is sensitive); uniform b-bit covers every layer unless
told otherwise. **None of these has a fast CPU kernel in torch**: the stored model is smaller, its latency is
that of fp32 (reported as such, no speedup claimed).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from splitinfer.compression.coding import CodedTensor, shared_weight, symmetric_codebook
from splitinfer.compression.layers import weight_layers

TTQ_THRESHOLD = 0.05


class Ternary(nn.Module):
    """Parametrization: TTQ ternary weights with learned positive/negative scales."""

    def __init__(self, weight: torch.Tensor, t: float = TTQ_THRESHOLD):
        super().__init__()
        self.t = t
        w = weight.detach()
        d = t * w.abs().max()
        pos, neg = w[w > d], w[w < -d]
        self.wp = nn.Parameter(pos.mean() if len(pos) else torch.tensor(1e-3))
        self.wn = nn.Parameter(-neg.mean() if len(neg) else torch.tensor(1e-3))

    def masks(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.t * w.detach().abs().max()
        return (w.detach() > d).float(), (w.detach() < -d).float()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        mp, mn = self.masks(w)
        out = self.wp * mp - self.wn * mn
        # STE to the latent weight, scaled as in TTQ (W_p / 1 / W_n in the three regions)
        scale = (self.wp.detach() * mp + self.wn.detach() * mn + (1 - mp - mn)).detach()
        return out + (w - w.detach()) * scale

    def coded(self, w: torch.Tensor) -> CodedTensor:
        mp, mn = self.masks(w)
        symbols = (mp + 2 * mn).long()
        book = torch.stack([torch.zeros(()), self.wp.detach(), -self.wn.detach(), torch.zeros(())]).unsqueeze(0)
        return CodedTensor(symbols, book.float(), 2)


class Binary(nn.Module):
    """Parametrization: sign(w) times the per-output-channel mean magnitude; clipped STE."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.detach().abs().flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
        hard = torch.where(w.detach() >= 0, alpha, -alpha)
        return hard + (w - w.detach()) * (w.detach().abs() <= 1).float()

    def coded(self, w: torch.Tensor) -> CodedTensor:
        alpha = w.detach().abs().flatten(1).mean(1)
        return CodedTensor((w.detach() >= 0).long(), torch.stack([-alpha, alpha], 1).float(), 1)


class Uniform(nn.Module):
    """Parametrization: symmetric per-channel uniform ``bits``-bit weights (power-of-two scales with pow2)."""

    def __init__(self, bits: int, pow2: bool = False):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be 2..8, got {bits}")
        self.bits, self.pow2 = bits, pow2
        self.q = (1 << (bits - 1)) - 1

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        s = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / self.q
        if self.pow2:
            s = torch.exp2(torch.ceil(torch.log2(s)))
        return s

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale(w).view(-1, *([1] * (w.dim() - 1)))
        return torch.clamp(torch.round(w.detach() / s), -self.q, self.q)

    def codebook(self, w: torch.Tensor) -> torch.Tensor:
        return symmetric_codebook(self.scale(w), self.bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        symbols = (self.levels(w) + self.q).long()
        hard = shared_weight(symbols, self.codebook(w))
        return hard + (w - w.detach())

    def coded(self, w: torch.Tensor) -> CodedTensor:
        return CodedTensor((self.levels(w) + self.q).long(), self.codebook(w), self.bits, scales=self.scale(w))


def quantizable(model: nn.Module, keep_ends: bool) -> list[tuple[str, nn.Module]]:
    """Weight layers to quantize: all, or all but the first and last with ``keep_ends``."""
    layers = weight_layers(model)
    return layers[1:-1] if keep_ends and len(layers) > 2 else layers


def attach(model: nn.Module, method: str, bits: dict[str, int] | None = None, pow2: bool = False,
           keep_ends: bool = True) -> dict[str, nn.Module]:
    """Register the quantizer parametrization of ``method`` (ternary, binary or uniform) on the model's layers
    (uniform: ``bits`` per layer name; a layer absent from ``bits`` stays float). Returns them by layer name."""
    out: dict[str, nn.Module] = {}
    for name, mod in quantizable(model, keep_ends and method in ("ternary", "binary")):
        if method == "ternary":
            q: nn.Module = Ternary(mod.weight)
        elif method == "binary":
            q = Binary()
        elif method == "uniform":
            if bits is None or name not in bits or bits[name] >= 32:
                continue
            q = Uniform(bits[name], pow2)
        else:
            raise ValueError(f"unknown quantization method {method!r}")
        parametrize.register_parametrization(mod, "weight", q)
        out[name] = q
    return out


def bake(model: nn.Module, quantizers: dict[str, nn.Module]) -> dict[str, CodedTensor]:
    """Replace every parametrized weight by its quantized value (a plain tensor) and return the coded layers
    by parameter name; the model then runs exactly on the decoded values."""
    coded: dict[str, CodedTensor] = {}
    with torch.no_grad():
        for name, q in quantizers.items():
            mod = model.get_submodule(name)
            latent = mod.parametrizations.weight.original.detach().clone()
            c = q.coded(latent)
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            mod.weight = nn.Parameter(c.values())
            coded[f"{name}.weight"] = c
    return coded
