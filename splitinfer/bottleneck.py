"""Learned bottleneck codec: encoder on the edge, few-bit quantization, entropy coding, decoder on the server.

At boundary ``k`` (features ``[Cb, H, W]``) the edge runs ``encoder`` (an ``s x s`` patch convolution, or a 3x3
one at stride 1, BN, ReLU, conv 1x1 down to ``channels``), maps each latent channel affinely onto
``0..2**bits - 1`` with a per-channel range calibrated on training data, rounds, and entropy-codes the symbols
(:mod:`splitinfer.entropy`). The server decodes the symbols, de-quantizes, and its ``decoder`` (conv 1x1, BN,
ReLU, conv 3x3, BN, ReLU, transposed convolution back to ``H x W``) rebuilds boundary-``k`` features for the
unchanged tail. :meth:`BottleneckConfig.for_boundary` sizes encoder and decoder from the boundary's shape.

Training is head-network distillation from the unmodified model (:func:`train_bottleneck`): no labels. The
backbone stays frozen; the loss matches the tail's features at a later boundary and the final logits
(temperature-scaled KL), or, when the tail is expensive, features at a nearer boundary only
(:func:`match_boundary`). Rounding is trained with a straight-through estimator once the ranges are
calibrated (quantization-aware fine-tuning). A deadline shortens the epochs so the schedule fits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitinfer.codec import Meta
from splitinfer.entropy import SymbolCoder, cross_entropy_bits, fit_tables
from splitinfer.errors import InvalidInput
from splitinfer.plan import BottleneckConfig
from splitinfer.progress import progress_bar
from splitinfer.staged import StagedModel

CODEC_NAME = "bottleneck"
DEFAULT_MAX_TAIL_COST = 50_000_000  # MAC-equivalents per sample (tail_cost); plan train-bottleneck's default


class BottleneckEncoder(nn.Module):
    """Boundary features -> continuous latent ``[channels, ceil(H/s), ceil(W/s)]``.

    With stride ``s > 1`` the first convolution is an ``s x s`` patch convolution (input padded to a multiple
    of ``s``): it costs a quarter of a 3x3 stride-2 convolution, which keeps encoding well under a millisecond.
    Token sequences ``[L, D]`` are seen as ``[D, L, 1]`` maps: the first layer is a 1x1 convolution (a linear
    map of each token's channels), or an ``s x 1`` patch merging ``s`` consecutive tokens.
    """

    def __init__(self, cfg: BottleneckConfig):
        super().__init__()
        cin = cfg.map_shape[0]
        s = cfg.stride
        self.tokens = cfg.tokens
        if s > 1:
            first = nn.Conv2d(cin, cfg.hidden, cfg.kernel, cfg.kernel, 0, bias=False)
        elif self.tokens:
            first = nn.Conv2d(cin, cfg.hidden, 1, bias=False)
        else:
            first = nn.Conv2d(cin, cfg.hidden, 3, 1, 1, bias=False)
        self.stride = s
        self.body = nn.Sequential(first, nn.BatchNorm2d(cfg.hidden), nn.ReLU(inplace=True),
                                  nn.Conv2d(cfg.hidden, cfg.channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:  # [N, L, D] -> [N, D, L, 1]
            x = x.transpose(1, 2).unsqueeze(-1)
        s = self.stride
        sw = 1 if self.tokens else s
        if s > 1 and (x.shape[-1] % sw or x.shape[-2] % s):
            x = F.pad(x, (0, -x.shape[-1] % sw, 0, -x.shape[-2] % s))
        return self.body(x)


class BottleneckDecoder(nn.Module):
    """De-quantized latent -> boundary features ``[Cb, H, W]`` (non-negative when the boundary is).

    conv 1x1 + BN + ReLU, conv 3x3 + BN + ReLU at the latent resolution, then a stride-``s`` transposed
    convolution back to the boundary's resolution (cropped to ``H x W``).
    """

    def __init__(self, cfg: BottleneckConfig, nonneg: bool):
        super().__init__()
        cout, h, w = cfg.map_shape
        s = cfg.stride
        self.tokens = cfg.tokens
        k = 1 if self.tokens else 3  # tokens: per-token layers only (their order is no image grid)
        if s > 1:
            last = nn.ConvTranspose2d(cfg.hidden, cout, cfg.kernel, cfg.kernel)
        else:
            last = nn.Conv2d(cfg.hidden, cout, k, 1, k // 2)
        self.body = nn.Sequential(
            nn.Conv2d(cfg.channels, cfg.hidden, 1, bias=False), nn.BatchNorm2d(cfg.hidden), nn.ReLU(inplace=True),
            nn.Conv2d(cfg.hidden, cfg.hidden, k, 1, k // 2, bias=False), nn.BatchNorm2d(cfg.hidden),
            nn.ReLU(inplace=True), last,
        )
        self.out_hw = (h, w)
        self.nonneg = nonneg

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.body(z)
        h, w = self.out_hw
        if y.shape[-2] != h or y.shape[-1] != w:
            y = y[..., :h, :w]
        y = F.relu(y) if self.nonneg else y
        return y.squeeze(-1).transpose(1, 2) if self.tokens else y  # tokens: [N, D, L, 1] -> [N, L, D]


class Quantizer(nn.Module):
    """Per-channel affine map of ``[lo_c, hi_c]`` onto ``0..L-1`` and back; rounding with a straight-through
    gradient in training."""

    def __init__(self, channels: int, bits: int):
        super().__init__()
        self.levels = 1 << bits
        self.register_buffer("lo", torch.zeros(channels))
        self.register_buffer("hi", torch.ones(channels))

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, 1, 1)

    def calibrate(self, z: torch.Tensor, q: float = 0.001) -> None:
        """Ranges from the ``q`` and ``1-q`` quantiles of each channel (clipping rare outliers)."""
        flat = z.detach().transpose(0, 1).reshape(z.shape[1], -1)
        if flat.shape[1] > 1_000_000:
            flat = flat[:, torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[:1_000_000]]
        lo = torch.quantile(flat, q, dim=1)
        hi = torch.quantile(flat, 1 - q, dim=1)
        hi = torch.where(hi - lo > 1e-6, hi, lo + 1e-6)
        self.lo.copy_(lo)
        self.hi.copy_(hi)

    def scale(self) -> torch.Tensor:
        return (self.hi - self.lo) / (self.levels - 1)

    def to_symbols(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latent -> integer symbols (float tensor holding integers)."""
        u = (z - self._view(self.lo)) / self._view(self.scale())
        return torch.round(u.clamp(0, self.levels - 1))

    def from_symbols(self, s: torch.Tensor) -> torch.Tensor:
        return s * self._view(self.scale()) + self._view(self.lo)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize; the gradient passes straight through the rounding (inside the range)."""
        u = ((z - self._view(self.lo)) / self._view(self.scale())).clamp(0, self.levels - 1)
        u = u + (torch.round(u) - u).detach()
        return self.from_symbols(u)


class Bottleneck(nn.Module):
    """Encoder + quantizer + decoder, plus the fitted per-channel probability tables."""

    def __init__(self, cfg: BottleneckConfig, nonneg: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = BottleneckEncoder(cfg)
        self.quantizer = Quantizer(cfg.channels, cfg.bits)
        self.decoder = BottleneckDecoder(cfg, nonneg)
        self.register_buffer("tables", torch.full((cfg.channels, 1 << cfg.bits), 1.0 / (1 << cfg.bits)))
        self.register_buffer("nonneg_flag", torch.tensor(1.0 if nonneg else 0.0))
        self.quantize = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.latent(x))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The (quantized-dequantized, when ``quantize``) latent the decoder receives."""
        z = self.encoder(x)
        return self.quantizer(z) if self.quantize else z

    @torch.no_grad()
    def latents(self, feats: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Continuous encoder outputs for boundary features ``feats`` (in batches, no gradients)."""
        return torch.cat([self.encoder(feats[i : i + batch]) for i in range(0, len(feats), batch)])

    @torch.no_grad()
    def calibrate(self, feats: torch.Tensor, ranges: bool = True) -> np.ndarray:
        """Fit the quantizer's per-channel ranges (unless ``ranges`` is false) and the probability tables on
        ``feats``; returns the symbols they produce."""
        return self.calibrate_latents(self.latents(feats), ranges)

    @torch.no_grad()
    def calibrate_latents(self, z: torch.Tensor, ranges: bool = True) -> np.ndarray:
        """As :meth:`calibrate`, on continuous encoder outputs ``z`` (:meth:`latents`) already computed."""
        if ranges:
            self.quantizer.calibrate(z)
        sym = self.quantizer.to_symbols(z).to(torch.uint8).numpy()
        self.tables.copy_(torch.from_numpy(fit_tables(sym, self.quantizer.levels)))
        return sym

    def macs(self) -> tuple[int, int]:
        """(encoder, decoder) multiply-accumulates per sample."""
        cin, _, _ = self.cfg.map_shape
        c, lh, lw = self.cfg.latent_shape
        hid, (sh, sw) = self.cfg.hidden, self.cfg.kernel
        k = 1 if self.cfg.tokens else 9
        k_first = k_last = sh * sw if self.cfg.stride > 1 else k
        enc = lh * lw * hid * (cin * k_first + c)
        dec = lh * lw * hid * (c + hid * k + cin * k_last)
        return enc, dec

    def state_for_bundle(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, cfg: BottleneckConfig, state: dict[str, torch.Tensor]) -> Bottleneck:
        if "nonneg_flag" not in state:
            raise ValueError("bottleneck weights lack 'nonneg_flag'")
        bn = cls(cfg, nonneg=bool(state["nonneg_flag"].item() > 0.5))
        bn.load_state_dict(state, strict=True)
        return bn.eval()


class LearnedCodec:
    """The :class:`~splitinfer.codec.Codec` of a trained bottleneck: ``encode`` runs the encoder,
    quantizes and entropy-codes; ``decode`` checks and entropy-decodes, de-quantizes and runs the decoder.

    ``meta`` carries nothing but the codec version: shapes are fixed by the bundle and the batch size is in
    the payload header.

    ``backend``: ``"onnxruntime"`` runs the (folded) encoder and decoder with ONNX Runtime, exported in memory
    when the codec is built — about 4x faster than eager torch for these tiny networks at batch 1, which
    keeps encode + decode under a millisecond; ``"torch"`` runs them eagerly; ``"auto"`` (default) takes ONNX
    Runtime when it imports and exports, else torch. Symbols can differ between backends only where a latent
    value lies within float rounding of a quantization step's midpoint.
    """

    name = CODEC_NAME

    def __init__(self, bottleneck: Bottleneck, max_batch: int = 1024, backend: str = "auto"):
        if backend not in ("auto", "onnxruntime", "torch"):
            raise ValueError(f"backend must be auto, onnxruntime or torch, not {backend!r}")
        self.bottleneck = bottleneck.eval()
        self.cfg = bottleneck.cfg
        self.levels = bottleneck.quantizer.levels
        self._encoder = fuse_bn(bottleneck.encoder)
        self._decoder = fuse_bn(bottleneck.decoder)
        self._fold_quantizer()
        self.coder = SymbolCoder(self.cfg.latent_shape, self.cfg.bits, bottleneck.tables.numpy(), self.cfg.coder,
                                 max_batch=max_batch)
        self._ort_encoder = self._ort_decoder = None
        self.backend = "torch"
        if backend != "torch":
            try:
                self._ort_encoder = _ort_session(self._encoder, torch.zeros(1, *self.cfg.in_shape))
                self._ort_decoder = _ort_session(self._decoder, torch.zeros(1, *self.cfg.latent_shape))
                self.backend = "onnxruntime"
            except Exception:  # onnxruntime missing or export unsupported here: eager torch still works
                if backend == "onnxruntime":
                    raise

    @property
    def boundary(self) -> int:
        return self.cfg.boundary

    def _latent(self, x: torch.Tensor) -> np.ndarray:
        """Encoder output in quantizer units (see _fold_quantizer), as float32 numpy."""
        if self._ort_encoder is not None:
            return self._ort_encoder.run(None, {"x": x.contiguous().numpy()})[0]
        with torch.inference_mode():
            return self._encoder(x).numpy()

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, Meta]:
        x = tensor.detach().to(torch.float32)
        if list(x.shape[1:]) != list(self.cfg.in_shape):
            raise InvalidInput(f"bottleneck at boundary {self.cfg.boundary} takes [B, "
                               f"{', '.join(map(str, self.cfg.in_shape))}] features, got {list(x.shape)}")
        u = self._latent(x)
        if not math.isfinite(float(u.sum())):  # NaN/inf in the features propagate to the latent's sum
            raise InvalidInput("cannot encode features holding NaN or infinite values")
        sym = np.rint(np.clip(u, 0, self.levels - 1)).astype(np.uint8)
        return self.coder.encode(sym), {"v": 1}

    def decode(self, payload: bytes, meta: Meta) -> torch.Tensor:
        return self.synthesize(self.decode_symbols(payload, meta))

    def roundtrip_each(self, tensor: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` of every sample as if encoded alone, for a whole batch: the quantized symbols
        are per-sample and the entropy coding is lossless, so only the networks see the batch (their results
        can differ from one sample at a time by float rounding)."""
        u = self._latent(tensor.detach().to(torch.float32).contiguous())
        return self.synthesize(np.rint(np.clip(u, 0, self.levels - 1)).astype(np.float32))

    def decode_symbols(self, payload: bytes, meta: Meta) -> np.ndarray:
        """First half of :meth:`decode`: check and entropy-decode to float32 symbols ``[B, *latent_shape]``."""
        if meta.get("v", 1) != 1:
            raise InvalidInput(f"bottleneck codec meta version {meta.get('v')!r} is not 1")
        return self.coder.decode(payload).astype(np.float32)

    def synthesize(self, symbols: np.ndarray) -> torch.Tensor:
        """Second half of :meth:`decode`: the decoder network on symbols ``[B, *latent_shape]`` (the symbols of
        several payloads may be concatenated: one call for a whole batch)."""
        if self._ort_decoder is not None:  # de-quantization is folded into the decoder's first convolution
            return torch.from_numpy(self._ort_decoder.run(None, {"x": symbols})[0])
        with torch.inference_mode():
            return self._decoder(torch.from_numpy(symbols))

    def _fold_quantizer(self) -> None:
        """Fold the quantizer's per-channel affine maps into the adjacent 1x1 convolutions: the encoder's last
        convolution then outputs ``(z - lo) / scale`` and the decoder's first one takes symbols directly."""
        q = self.bottleneck.quantizer
        scale, lo = q.scale().detach(), q.lo.detach()
        with torch.no_grad():
            last = self._encoder.body[-1]
            last.weight.div_(scale.view(-1, 1, 1, 1))
            last.bias.sub_(lo).div_(scale)
            first = self._decoder.body[0]
            if first.bias is None:
                first.bias = nn.Parameter(torch.zeros(first.out_channels))
            first.bias.add_((first.weight[:, :, 0, 0] * lo.view(1, -1)).sum(1))
            first.weight.mul_(scale.view(1, -1, 1, 1))

    def symbols(self, x: torch.Tensor) -> np.ndarray:
        """Quantized symbols of features ``x`` (for rate measurement)."""
        return np.rint(np.clip(self._latent(x.detach().to(torch.float32)), 0, self.levels - 1)).astype(np.uint8)


def _ort_session(module: nn.Module, example: torch.Tensor):
    """An ONNX Runtime session (1 thread) for ``module``, exported in memory with a dynamic batch dimension."""
    from splitinfer.onnx_util import export_onnx, session

    return session(export_onnx(module, example), f"the bottleneck's {type(module).__name__}")


def fuse_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference with every ``Conv2d`` directly followed by ``BatchNorm2d`` (inside a
    ``Sequential``) folded into one convolution."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(module).eval()
    for seq in [m for m in out.modules() if isinstance(m, nn.Sequential)]:
        layers = list(seq)
        fused: list[nn.Module] = []
        i = 0
        while i < len(layers):
            if (i + 1 < len(layers) and type(layers[i]) is nn.Conv2d and isinstance(layers[i + 1], nn.BatchNorm2d)):
                fused.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
                i += 2
            else:
                fused.append(layers[i])
                i += 1
        for name in list(seq._modules):
            del seq._modules[name]
        for j, layer in enumerate(fused):
            seq.add_module(str(j), layer)
    return out


# ---------------------------------------------------------------------------------------------- training


@dataclass
class DistillConfig:
    """Hyper-parameters of :func:`train_bottleneck`.

    ``max_tail_cost``: when a training step through the tail after the bottleneck's boundary costs more than
    this many MAC-equivalents per sample (:func:`tail_cost`), the student matches features at a nearer boundary
    instead of running the whole tail at every step (:func:`match_boundary`); None always distils through the
    whole tail (:data:`DEFAULT_MAX_TAIL_COST` is what ``plan train-bottleneck`` uses).
    ``cache_mb``: memory for the training images' boundary features and the teacher's targets; whatever does
    not fit is recomputed for every batch (slower, same result).
    """

    epochs_float: int = 1
    epochs_qat: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 2.0
    feature_weight: float = 1.0
    seed: int = 0
    threads: int = 0
    max_tail_cost: int | None = None
    cache_mb: int = 2048
    # the privacy defence (:class:`InversionAdversary`): "none", or "adversarial" (the encoder also maximises
    # the reconstruction error of an inversion decoder trained alongside it on the quantized latent), weighted
    # by ``privacy_weight`` against the distillation loss
    privacy: str = "none"
    privacy_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.privacy not in PRIVACY_DEFENCES:
            raise ValueError(f"privacy defence must be one of {', '.join(PRIVACY_DEFENCES)}, not {self.privacy!r}")
        if not self.privacy_weight >= 0:
            raise ValueError(f"privacy_weight must be >= 0, got {self.privacy_weight}")


PRIVACY_DEFENCES = ("none", "adversarial")


class InversionAdversary:
    """The adversary of the ``adversarial`` privacy defence: an inversion decoder (the attack harness's
    :class:`~splitinfer.inversion.InversionDecoder`, unbounded output) from the quantized latent to the
    normalised input, trained one Adam step per training step on the current encoder's latents. Its loss is
    the MSE divided by the input's variance (1.0 = no better than predicting the mean image); the encoder's
    loss subtracts ``weight`` times it, so the encoder learns to keep the task while making the input hard to
    rebuild. The harness then attacks the finished codec with a fresh decoder: this one is not the judge."""

    def __init__(self, latent_shape, input_shape, weight: float, lr: float = 2e-3, seed: int = 0):
        from splitinfer.inversion import InversionDecoder

        torch.manual_seed(seed)
        self.decoder = InversionDecoder(latent_shape, input_shape, bounded=False)
        self.opt = torch.optim.Adam(self.decoder.parameters(), lr=lr)
        self.weight = weight
        self.last = float("nan")
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Normalised reconstruction error of inputs ``x`` from latents ``z`` (gradients flow to both)."""
        return F.mse_loss(self.decoder(z), x) / x.var().clamp_min(1e-6)

    def step(self) -> None:
        """One training step of the adversary on the latents of the last encoder step (if any)."""
        if self.pending is None:
            return
        z, x = self.pending
        self.pending = None
        self.decoder.train()
        loss = self.loss(z, x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.last = float(loss.detach())


ACTIVATION_MACS = 256  # training cost of one activation element, in multiply-accumulates (see tail_cost)


def tail_cost(staged: StagedModel, start: int, end: int) -> int:
    """Estimated cost per sample of a training step (forward and backward) through stages ``start..end-1``, in
    MAC-equivalents: their multiply-accumulates plus :data:`ACTIVATION_MACS` for every element of the boundary
    tensors they output.

    MACs alone miss memory-bound layers: the default model's tail after boundary 6 and MobileNetV2's (64x64)
    after boundary 17 both have 18.3 M MACs, yet a step took 11 and 39 ms per image here (2 cores); the
    boundary tensors they write hold 43 K and 323 K elements. The constant fits those two and keeps the
    others measured then within a factor of 1.5 (MobileNetV2 after 9, 27, 38: 51, 32, 23 ms).
    """
    n = staged.num_stages
    elements = sum(staged.boundaries[i].numel for i in range(start + 1, min(end, n) + 1))
    return staged.macs_between(start, end) + ACTIVATION_MACS * elements


def match_boundary(staged: StagedModel, boundary: int, max_tail_cost: int | None = None) -> int:
    """The boundary whose features the student matches.

    By default the last ``[C, H, W]`` (or ``[L, D]`` token) boundary after ``boundary`` (for the default model
    the globally pooled 96x1x1 penultimate features), or the output when none exists; the loss then adds the KL
    divergence of the final logits, so every training step runs the whole tail forward and backward.

    When ``max_tail_cost`` is given and the whole tail costs more than that (:func:`tail_cost`, per sample),
    the deepest ``[C, H, W]`` boundary reached within ``max_tail_cost`` (at least the first one after a layer
    that computes anything), provided it costs at most half the whole tail (else the last one, as above): the
    loss is then the feature MSE there only. That is still distillation through the frozen network (the error
    that counts is the one the next layers do not discard, not a plain reconstruction of the boundary), at a
    fraction of the cost; it gives up matching the output directly, so it is used only where the whole tail is
    expensive. With :data:`DEFAULT_MAX_TAIL_COST` the default model keeps the whole tail at every boundary;
    MobileNetV2 at 64x64 matches nearer up to its boundary 17 (steps about 3 times cheaper).
    """
    n = staged.num_stages
    spatial = [b.index for b in staged.boundaries if len(b.shape) in (2, 3) and boundary < b.index < n]
    last = spatial[-1] if spatial else n
    whole = tail_cost(staged, boundary, n)
    if max_tail_cost is None or whole <= max_tail_cost:
        return last
    costs = {m: tail_cost(staged, boundary, m) for m in spatial}
    computes = [m for m in spatial if staged.macs_between(boundary, m) > 0]
    within = [m for m in computes if costs[m] <= max_tail_cost]
    near = within[-1] if within else computes[0] if computes else last
    return near if costs.get(near, whole) * 2 <= whole else last


def _batches(n: int, batch: int, gen: torch.Generator, limit: int | None = None):
    """Random batches of ``0..n-1`` (a new permutation per call); at most ``limit`` of them."""
    perm = torch.randperm(n, generator=gen)
    for j, i in enumerate(range(0, n, batch)):
        if limit is not None and j >= limit:
            return
        yield perm[i : i + batch]


@torch.no_grad()
def _features(staged: StagedModel, x, boundary: int, batch: int = 512) -> torch.Tensor:
    return torch.cat([staged.run(x[i : i + batch], 0, boundary).clone() for i in range(0, len(x), batch)])


class _Features:
    """Boundary-``k`` features of the training inputs: all computed once when they fit in ``budget`` bytes,
    else recomputed from the inputs for every batch (the head is frozen, so both give the same values)."""

    def __init__(self, staged: StagedModel, x, k: int, budget: int):
        self.staged, self.x, self.k, self.n = staged, x, k, len(x)
        self.cached = self.n * staged.boundaries[k].fp32_bytes <= budget
        self.feats = _features(staged, x, k) if self.cached else None
        self.nbytes = self.feats.numel() * 4 if self.feats is not None else 0

    @torch.no_grad()
    def get(self, idx: torch.Tensor) -> torch.Tensor:
        if self.feats is not None:
            return self.feats[idx]
        return self.staged.run(self.x[idx], 0, self.k).clone()

    def chunks(self, idx: torch.Tensor, batch: int = 512):
        for i in range(0, len(idx), batch):
            yield self.get(idx[i : i + batch])


class _Targets:
    """The teacher's targets: features at the match boundary ``m`` and, with ``logits``, its output; cached
    like :class:`_Features` when they fit in ``budget`` bytes."""

    def __init__(self, staged: StagedModel, src: _Features, k: int, m: int, logits: bool, budget: int,
                 needed: bool):
        self.staged, self.src, self.k, self.m, self.logits = staged, src, k, m, logits
        n = staged.num_stages
        per = staged.boundaries[m].fp32_bytes + (staged.boundaries[n].fp32_bytes if logits and m < n else 0)
        self.cached = needed and src.n * per <= budget
        self.feat = self.out = None
        if self.cached:
            parts = [self._compute(src.get(idx)) for idx in torch.arange(src.n).split(512)]
            self.feat = torch.cat([p[0] for p in parts])
            self.out = torch.cat([p[1] for p in parts]) if logits else None

    @torch.no_grad()
    def _compute(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.staged.num_stages
        t = self.staged.run(f.clone(), self.k, self.m)
        if not self.logits:
            return t, None
        return t, (self.staged.run(t.clone(), self.m, n) if self.m < n else t)

    def get(self, idx: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Targets of samples ``idx`` whose boundary features are ``f``."""
        if self.feat is not None:
            return self.feat[idx], (self.out[idx] if self.out is not None else None)
        return self._compute(f)


def _calibration_indices(n: int, per_sample_bytes: int, budget: int, gen: torch.Generator) -> torch.Tensor:
    """Samples the quantizer ranges and tables are fitted on: all of them when their latents fit in ``budget``
    bytes, else a random subset that does."""
    keep = max(1, budget // max(1, per_sample_bytes))
    if keep >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:keep].sort().values


def train_bottleneck(staged: StagedModel, cfg: BottleneckConfig, x_train,
                     dcfg: DistillConfig | None = None, progress: bool = True,
                     init: Bottleneck | None = None, deadline: float | None = None) -> tuple[Bottleneck, dict]:
    """Train a bottleneck at ``cfg.boundary`` by distillation from the frozen ``staged`` model (no labels).

    ``x_train``: the model's (normalised) inputs, a float tensor ``[N, C, H, W]`` or any object with ``len``
    whose slices and index tensors give such tensors (e.g. images normalised batch by batch).

    Phase 1 trains encoder and decoder without rounding; the quantizer's per-channel ranges are then
    calibrated on the training latents; phase 2 fine-tunes with rounding in the loop (straight-through).
    Finally the per-channel symbol tables are fitted. ``init`` starts from another bottleneck's encoder and
    decoder (same architecture, any bit width).

    ``deadline`` (a :func:`time.perf_counter` value): after the fixed costs (features, targets) the time of a
    training step is measured on a scratch copy, and every epoch is shortened to a random subset of the
    training images so that both phases, learning-rate schedules included, end by then; should it still run
    over, training stops at the deadline (``report["stopped_early"]``) and the bottleneck is finished
    (ranges, tables) as it is. Returns the bottleneck (eval mode) and a report.
    """
    dcfg = dcfg or DistillConfig()
    t_start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if dcfg.threads:
        torch.set_num_threads(dcfg.threads)
    try:
        return _train(staged, cfg, x_train, dcfg, progress, init, deadline, t_start)
    finally:
        torch.set_num_threads(prev_threads)


def _train(staged: StagedModel, cfg: BottleneckConfig, x_train, dcfg: DistillConfig, progress: bool,
           init: Bottleneck | None, deadline: float | None, t_start: float) -> tuple[Bottleneck, dict]:
    torch.manual_seed(dcfg.seed)
    gen = torch.Generator().manual_seed(dcfg.seed)
    staged.eval()
    for p in staged.parameters():
        p.requires_grad_(False)
    k, n = cfg.boundary, staged.num_stages
    if not 0 < k < n:
        raise ValueError(f"bottleneck boundary {k} must be inside 1..{n - 1}")
    if list(staged.boundaries[k].shape) != list(cfg.in_shape):
        raise ValueError(f"boundary {k} has shape {staged.boundaries[k].shape}, config says {list(cfg.in_shape)}")
    if len(x_train) < 1:
        raise ValueError("no training images")
    full = match_boundary(staged, k)
    m = match_boundary(staged, k, dcfg.max_tail_cost)
    with_logits = m == full  # full distillation: the last [C, H, W] features and the output
    total_epochs = dcfg.epochs_float + dcfg.epochs_qat
    budget = int(dcfg.cache_mb) << 20
    src = _Features(staged, x_train, k, budget)
    calib = _calibration_indices(src.n, 4 * math.prod(cfg.latent_shape), max(256 << 20, budget // 4), gen)
    if src.feats is not None:
        nonneg = bool(src.feats.min() >= 0)
    else:
        nonneg = all(bool(f.min() >= 0) for f in src.chunks(calib[:4096]))
    bn = Bottleneck(cfg, nonneg)
    if init is not None:
        keep = {k: v for k, v in init.state_dict().items() if k.startswith(("encoder.", "decoder."))}
        bn.load_state_dict(keep, strict=False)
    targets = _Targets(staged, src, k, m, with_logits, budget - src.nbytes, needed=total_epochs > 0)
    if targets.feat is not None:
        feat_scale = float(targets.feat.pow(2).mean())
    elif total_epochs > 0:  # estimated on (up to) 2048 samples
        sub = calib[:2048]
        feat_scale = float(torch.cat([targets.get(i, src.get(i))[0] for i in sub.split(512)]).pow(2).mean())
    else:
        feat_scale = 1.0
    feat_scale = feat_scale if feat_scale > 0 else 1.0
    steps_per_epoch = math.ceil(src.n / dcfg.batch_size)
    steps = steps_per_epoch  # per epoch; fewer when a deadline would cut the schedule
    T = dcfg.temperature

    adversary = None
    if dcfg.privacy == "adversarial":
        adversary = InversionAdversary(cfg.latent_shape, staged.boundaries[0].shape, dcfg.privacy_weight,
                                       seed=dcfg.seed)

    def loss_of(model: Bottleneck, idx: torch.Tensor) -> torch.Tensor:
        f = src.get(idx)
        t_feat, t_out = targets.get(idx, f)
        z = model.latent(f)
        s_feat = staged.run(model.decoder(z).clone(), k, m)  # a stage may begin in place
        loss = F.mse_loss(s_feat, t_feat) / feat_scale
        if with_logits:
            s_out = staged.run(s_feat.clone(), m, n) if m < n else s_feat
            kl = F.kl_div(F.log_softmax(s_out / T, 1), F.softmax(t_out / T, 1), reduction="batchmean") * T * T
            loss = dcfg.feature_weight * loss + kl
        if adversary is not None and model is bn:
            x = torch.as_tensor(src.x[idx])
            loss = loss - adversary.weight * adversary.loss(z, x)
            adversary.pending = (z.detach(), x)  # trained after the encoder's step (its weights are in the graph)
        return loss

    if deadline is not None and total_epochs > 0:
        step_s = _time_step(bn, loss_of, src.n, dcfg, gen)
        fit = int((deadline - time.perf_counter()) / step_s) if step_s > 0 else steps * total_epochs
        if fit < steps * total_epochs:
            steps = max(1, fit // total_epochs)
    history: list[dict] = []
    stopped_early = False
    ranges_calibrated = False
    bar = progress_bar(total=total_epochs * steps, desc=f"bottleneck@{k}", enabled=progress, leave=False)
    try:
        for phase, epochs in (("float", dcfg.epochs_float), ("qat", dcfg.epochs_qat)):
            if epochs <= 0 or stopped_early:
                continue
            if phase == "qat":
                bn.eval()
                with torch.no_grad():
                    bn.quantizer.calibrate(torch.cat([bn.encoder(f) for f in src.chunks(calib)]))
                ranges_calibrated = True
            bn.quantize = phase == "qat"
            lr = dcfg.lr if phase == "float" else dcfg.lr / 2
            opt = torch.optim.AdamW(bn.parameters(), lr=lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
            for epoch in range(epochs):
                bn.train()
                total, count, adv_total = 0.0, 0, 0.0
                for idx in _batches(src.n, dcfg.batch_size, gen, steps):
                    loss = loss_of(bn, idx)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    if adversary is not None:
                        adversary.step()
                        adv_total += adversary.last * len(idx)
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
                    bar.update(1)
                    if deadline is not None and time.perf_counter() > deadline:
                        stopped_early = True
                        break
                entry = {"phase": phase, "epoch": epoch + 1, "loss": round(total / max(1, count), 5)}
                if count < src.n:
                    entry["images"] = count
                if adversary is not None:
                    entry["adversary_loss"] = round(adv_total / max(1, count), 5)
                history.append(entry)
                if stopped_early:
                    break
        bn.eval()
        bn.quantize = True
        with torch.no_grad():
            z = torch.cat([bn.encoder(f) for f in src.chunks(calib)])
        sym = bn.calibrate_latents(z, ranges=not ranges_calibrated)  # QAT calibrated its ranges before tuning
        tables = bn.tables.numpy()
    finally:
        bar.close()
    report = {
        "boundary": k, "match_boundary": m, "match": "features+logits" if with_logits else "features",
        "tail_cost": tail_cost(staged, k, n), "match_cost": tail_cost(staged, k, m),
        "train_images": src.n, "nonneg": nonneg,
        "history": history, "train_seconds": round(time.perf_counter() - t_start, 1),
        "train_bits_per_sample": round(cross_entropy_bits(sym, tables), 2),
        "config": cfg.to_params(), "distill": asdict(dcfg),
    }
    if steps < steps_per_epoch:
        report["steps_per_epoch"] = {"planned": steps_per_epoch, "run": steps}
    if deadline is not None:
        report["stopped_early"] = stopped_early
    if not (src.cached and (targets.cached or total_epochs == 0)) or len(calib) < src.n:
        report["cache"] = {"features": src.cached, "targets": targets.cached, "calibration_images": len(calib)}
    return bn, report


def _time_step(bn: Bottleneck, loss_of: Callable[[Bottleneck, torch.Tensor], torch.Tensor], n: int,
               dcfg: DistillConfig, gen: torch.Generator) -> float:
    """Seconds per training step, measured on a scratch copy of ``bn``: a warm-up step on a few samples, then one
    full batch. The random state of ``gen`` is restored, so training does not depend on the measurement."""
    import copy

    state = gen.get_state()
    scratch = copy.deepcopy(bn).train()
    opt = torch.optim.SGD(scratch.parameters(), lr=0.0)
    perm = torch.randperm(n, generator=gen)
    gen.set_state(state)
    elapsed = 0.0
    for idx in (perm[: min(8, dcfg.batch_size)], perm[: dcfg.batch_size]):
        t0 = time.perf_counter()
        loss = loss_of(scratch, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - t0
    return elapsed


# ---------------------------------------------------------------------------------------------- several boundaries

TRAINED_WEIGHTS = ("committed", "checkpoint")  # teachers whose answers mean something: labels are used
EVAL_RESERVE = 0.15  # share of each boundary's time budget kept for calibration and the test evaluation


def bottleneck_boundaries(staged: StagedModel) -> list[int]:
    """The boundaries a bottleneck can attach to: interior boundaries with ``[C, H, W]`` features or ``[L, D]``
    tokens."""
    return [b.index for b in staged.boundaries if 0 < b.index < staged.num_stages and len(b.shape) in (2, 3)]


def _ranges(values: Sequence[int]) -> str:
    """``1,2,3,5`` -> ``1-3, 5``."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def check_boundaries(staged: StagedModel, boundaries: Sequence[int], model: str = "the model") -> None:
    """ValueError naming the valid boundaries when one of ``boundaries`` cannot take a bottleneck, when none is
    given, or when one repeats."""
    valid = bottleneck_boundaries(staged)
    if not boundaries:
        raise ValueError(f"no boundary given; {model}'s [C, H, W] / [L, D] boundaries are {_ranges(valid)}")
    bad = [b for b in boundaries if b not in valid]
    if bad:
        raise ValueError(f"boundary {', '.join(map(str, bad))} is not an interior [C, H, W] or [L, D] boundary "
                         f"of {model} "
                         f"({staged.num_stages} stages); choose from {_ranges(valid)}")
    if len(set(boundaries)) != len(boundaries):
        raise ValueError(f"boundaries repeat: {list(boundaries)}")


@dataclass
class CodecEval:
    """Rate and accuracy of one codec on a set of images (per offloaded sample). ``accuracy`` and
    ``reference_accuracy`` are None without labels; ``agreement`` is with the uncompressed model."""

    bytes_mean: float
    accuracy: float | None
    agreement: float
    reference_accuracy: float | None

    def to_dict(self) -> dict:
        """JSON figures: bytes_mean, accuracy, agreement, reference_accuracy, drop_points (no accuracy keys
        without labels)."""
        scored = self.accuracy is not None and self.reference_accuracy is not None
        out: dict = {"bytes_mean": round(self.bytes_mean, 2)}
        if scored:
            out["accuracy"] = round(self.accuracy, 5)
        out["agreement"] = round(self.agreement, 5)
        if scored:
            out["reference_accuracy"] = round(self.reference_accuracy, 5)
            out["drop_points"] = round(100 * (self.reference_accuracy - self.accuracy), 3)
        return out


@torch.inference_mode()
def evaluate_codec(staged: StagedModel, codec, boundary: int, x, y: np.ndarray | None,
                   batch: int = 500, bytes_limit: int | None = None,
                   reference: np.ndarray | None = None) -> CodecEval:
    """Encode every sample's boundary features on its own (as the edge does), decode, run the tail; compare
    with labels ``y`` (None: no accuracy) and with the uncompressed model. ``x``: normalised inputs (a tensor,
    or anything whose slices are such tensors). With ``bytes_limit`` (a codec with ``roundtrip_each``) the
    answers come from the batched per-sample round trip and only the first ``bytes_limit`` samples are
    entropy-coded, for their payload sizes: much faster, same symbols. ``reference``: the uncompressed model's
    answers for ``x`` when the caller has them already (the planner does), saving a tail run per batch."""
    n = staged.num_stages
    if reference is not None and len(reference) != len(x):
        raise ValueError(f"reference holds {len(reference)} answers for {len(x)} inputs")
    sizes, preds, refs = [], [], []
    for i in range(0, len(x), batch):
        f = staged.run(x[i : i + batch], 0, boundary)
        refs.append(staged.run(f.clone(), boundary, n).argmax(1) if reference is None
                    else torch.as_tensor(np.asarray(reference[i : i + batch])))
        if bytes_limit is not None:
            for j in range(min(len(f), bytes_limit - len(sizes))):
                sizes.append(len(codec.encode(f[j : j + 1])[0]))
            preds.append(staged.run(codec.roundtrip_each(f), boundary, n).argmax(1))
            continue
        dec = []
        for j in range(len(f)):
            payload, meta = codec.encode(f[j : j + 1])
            sizes.append(len(payload))
            dec.append(codec.decode(payload, meta))
        preds.append(staged.run(torch.cat(dec), boundary, n).argmax(1))
    p, r = torch.cat(preds).numpy(), torch.cat(refs).numpy()
    if y is None:
        return CodecEval(bytes_mean=float(np.mean(sizes)), accuracy=None, agreement=float((p == r).mean()),
                         reference_accuracy=None)
    y = np.asarray(y)
    return CodecEval(bytes_mean=float(np.mean(sizes)), accuracy=float((p == y).mean()),
                     agreement=float((p == r).mean()), reference_accuracy=float((r == y).mean()))


def agreement_note(teacher_weights: str, model: str = "the model") -> str | None:
    """What the test figures mean when the teacher's weights are not trained (no accuracy), else None."""
    if teacher_weights == "random":
        return (f"agreement with a random teacher, not accuracy: {model} has random weights (give --checkpoint "
                "with trained weights to measure accuracy)")
    if teacher_weights not in TRAINED_WEIGHTS:
        return (f"agreement with {model}'s own answers, not accuracy: its weights are whatever its factory "
                "returns (give --checkpoint to measure accuracy)")
    return None


def train_bottlenecks(staged: StagedModel, boundaries: Sequence[int], x_train, x_test, y_test: np.ndarray | None,
                      *, bits: int, coder: str = "ans", channels: int | None = None, hidden: int | None = None,
                      stride: int | None = None, dcfg: DistillConfig | None = None, budget_s: float | None = None,
                      teacher_weights: str = "committed", model: str = "the model", progress: bool = True,
                      on_result: Callable[[Bottleneck, dict], None] | None = None,
                      echo: Callable[[str], None] | None = None) -> list[tuple[Bottleneck, dict]]:
    """Train a bottleneck at each of ``boundaries``, in order, by distillation from the frozen ``staged`` model
    (:func:`train_bottleneck`, no labels), and evaluate each on ``x_test`` (every sample encoded on its own).

    The architecture follows :meth:`BottleneckConfig.for_boundary` (``channels``, ``hidden``, ``stride``
    override it). ``y_test`` scores accuracy only when ``teacher_weights`` is ``committed`` or ``checkpoint``;
    otherwise the test figures are bytes and agreement with the teacher, and each report's ``note`` says so
    (``random``: "agreement with a random teacher, not accuracy").

    ``budget_s``: seconds for the whole call. Each boundary gets an equal share of what is left when it starts:
    85 % for training, whose epochs are shortened to fit (``deadline`` of :func:`train_bottleneck`), the rest
    for calibration and the test evaluation. When the budget is spent before a boundary starts, it and every
    later one are not trained: ``echo`` is told, and the last trained report's ``budget.not_trained`` lists
    them. ``on_result`` is called with each trained ``(bottleneck, report)`` as soon as it is ready (e.g. to
    save it). Returns the trained ones, in order.
    """
    dcfg = dcfg or DistillConfig()
    check_boundaries(staged, list(boundaries), model)
    labels = y_test if teacher_weights in TRAINED_WEIGHTS else None
    note = agreement_note(teacher_weights, model)
    t0 = time.perf_counter()
    results: list[tuple[Bottleneck, dict]] = []
    for i, b in enumerate(boundaries):
        start = time.perf_counter()
        cfg = BottleneckConfig.for_boundary(b, staged.boundaries[b].shape, bits=bits, coder=coder,
                                            channels=channels, hidden=hidden, stride=stride)
        deadline = None
        budget: dict = {}
        if budget_s is not None:
            remaining = budget_s - (start - t0)
            if remaining <= 0:
                skipped = list(boundaries[i:])
                why = (f"the time budget of {budget_s:g} s was spent after {start - t0:.0f} s: boundaries "
                       f"{', '.join(map(str, skipped))} not trained")
                if results:
                    results[-1][1]["budget"]["not_trained"] = skipped
                    results[-1][1]["budget"]["stopped"] = why
                if echo is not None:
                    echo(why)
                break
            share = remaining / (len(boundaries) - i)
            budget = {"budget_s": budget_s, "share_s": round(share, 1)}
            deadline = start + share * (1 - EVAL_RESERVE)
        bn, report = train_bottleneck(staged, cfg, x_train, dcfg, progress=progress, deadline=deadline)
        ev = evaluate_codec(staged, LearnedCodec(bn), b, x_test, labels)
        report["test"] = ev.to_dict()
        report["test_images"] = len(x_test)
        report["fp32_bytes"] = staged.boundaries[b].fp32_bytes
        report["teacher_weights"] = teacher_weights
        if note:
            report["note"] = note
        if budget:
            report["budget"] = {**budget, "stopped_early": bool(report.get("stopped_early"))}
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["torch"] = torch.__version__
        results.append((bn, report))
        if on_result is not None:
            on_result(bn, report)
    return results


def requantize(bn: Bottleneck, bits: int, feats: torch.Tensor) -> Bottleneck:
    """A copy of ``bn`` quantized at ``bits`` instead (post-training: ranges and tables re-fitted on ``feats``)."""
    cfg = BottleneckConfig(**{**asdict(bn.cfg), "bits": bits})
    out = Bottleneck(cfg, nonneg=bool(bn.nonneg_flag.item() > 0.5))
    state = {k: v for k, v in bn.state_dict().items() if not k.startswith("quantizer.") and k != "tables"}
    out.load_state_dict(state, strict=False)
    out.eval()
    out.calibrate(feats)
    return out
