"""Learned bottleneck codec: encoder on the edge, few-bit quantization, entropy coding, decoder on the server.

At boundary ``k`` (features ``[Cb, H, W]``) the edge runs ``encoder`` (conv 3x3 with optional stride, BN,
ReLU, conv 1x1 down to ``channels``), maps each latent channel affinely onto ``0..2**bits - 1`` with a
per-channel range calibrated on training data, rounds, and entropy-codes the symbols
(:mod:`splitinfer.entropy`). The server decodes the symbols, de-quantizes, and its ``decoder`` (conv 1x1, BN,
ReLU, nearest upsampling to ``H x W``, conv 3x3) rebuilds boundary-``k`` features for the unchanged tail.

Training is head-network distillation from the unmodified model (:func:`train_bottleneck`): no labels. The
backbone stays frozen; the loss matches the tail's features at a later boundary and the final logits
(temperature-scaled KL). Rounding is trained with a straight-through estimator once the ranges are
calibrated (quantization-aware fine-tuning).
"""

from __future__ import annotations

import math
import time
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


class BottleneckEncoder(nn.Module):
    """Boundary features -> continuous latent ``[channels, ceil(H/s), ceil(W/s)]``.

    With stride ``s > 1`` the first convolution is an ``s x s`` patch convolution (input padded to a multiple
    of ``s``): it costs a quarter of a 3x3 stride-2 convolution, which keeps encoding well under a millisecond.
    """

    def __init__(self, cfg: BottleneckConfig):
        super().__init__()
        cin = cfg.in_shape[0]
        s = cfg.stride
        first = nn.Conv2d(cin, cfg.hidden, s, s, 0, bias=False) if s > 1 else nn.Conv2d(cin, cfg.hidden, 3, 1, 1,
                                                                                         bias=False)
        self.stride = s
        self.body = nn.Sequential(first, nn.BatchNorm2d(cfg.hidden), nn.ReLU(inplace=True),
                                  nn.Conv2d(cfg.hidden, cfg.channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        if s > 1 and (x.shape[-1] % s or x.shape[-2] % s):
            x = F.pad(x, (0, -x.shape[-1] % s, 0, -x.shape[-2] % s))
        return self.body(x)


class BottleneckDecoder(nn.Module):
    """De-quantized latent -> boundary features ``[Cb, H, W]`` (non-negative when the boundary is).

    conv 1x1 + BN + ReLU, conv 3x3 + BN + ReLU at the latent resolution, then a stride-``s`` transposed
    convolution back to the boundary's resolution (cropped to ``H x W``).
    """

    def __init__(self, cfg: BottleneckConfig, nonneg: bool):
        super().__init__()
        cout, h, w = cfg.in_shape
        s = cfg.stride
        last = nn.ConvTranspose2d(cfg.hidden, cout, s, s) if s > 1 else nn.Conv2d(cfg.hidden, cout, 3, 1, 1)
        self.body = nn.Sequential(
            nn.Conv2d(cfg.channels, cfg.hidden, 1, bias=False), nn.BatchNorm2d(cfg.hidden), nn.ReLU(inplace=True),
            nn.Conv2d(cfg.hidden, cfg.hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(cfg.hidden), nn.ReLU(inplace=True),
            last,
        )
        self.out_hw = (h, w)
        self.nonneg = nonneg

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.body(z)
        h, w = self.out_hw
        if y.shape[-2] != h or y.shape[-1] != w:
            y = y[..., :h, :w]
        return F.relu(y) if self.nonneg else y


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
        z = self.encoder(x)
        if self.quantize:
            z = self.quantizer(z)
        return self.decoder(z)

    @torch.no_grad()
    def latents(self, feats: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Continuous encoder outputs for boundary features ``feats`` (in batches, no gradients)."""
        return torch.cat([self.encoder(feats[i : i + batch]) for i in range(0, len(feats), batch)])

    @torch.no_grad()
    def calibrate(self, feats: torch.Tensor, ranges: bool = True) -> np.ndarray:
        """Fit the quantizer's per-channel ranges (unless ``ranges`` is false) and the probability tables on
        ``feats``; returns the symbols they produce."""
        z = self.latents(feats)
        if ranges:
            self.quantizer.calibrate(z)
        sym = self.quantizer.to_symbols(z).to(torch.uint8).numpy()
        self.tables.copy_(torch.from_numpy(fit_tables(sym, self.quantizer.levels)))
        return sym

    def macs(self) -> tuple[int, int]:
        """(encoder, decoder) multiply-accumulates per sample."""
        cin, _, _ = self.cfg.in_shape
        c, lh, lw = self.cfg.latent_shape
        hid, s = self.cfg.hidden, self.cfg.stride
        k_first = s * s if s > 1 else 9
        k_last = s * s if s > 1 else 9
        enc = lh * lw * hid * (cin * k_first + c)
        dec = lh * lw * hid * (c + hid * 9 + cin * k_last)
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
    epochs_float: int = 1
    epochs_qat: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 2.0
    feature_weight: float = 1.0
    seed: int = 0
    threads: int = 0


def match_boundary(staged: StagedModel, boundary: int) -> int:
    """The boundary whose features the student matches: the last ``[C, H, W]`` boundary after ``boundary`` (for
    the default model the globally pooled 96x1x1 penultimate features), or the output when none exists."""
    spatial = [b.index for b in staged.boundaries if len(b.shape) == 3 and b.index > boundary]
    return spatial[-1] if spatial else staged.num_stages


def _batches(n: int, batch: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        yield perm[i : i + batch]


@torch.no_grad()
def _features(staged: StagedModel, x: torch.Tensor, boundary: int, batch: int = 512) -> torch.Tensor:
    return torch.cat([staged.run(x[i : i + batch], 0, boundary).clone() for i in range(0, len(x), batch)])


def train_bottleneck(staged: StagedModel, cfg: BottleneckConfig, x_train: torch.Tensor,
                     dcfg: DistillConfig | None = None, progress: bool = True,
                     init: Bottleneck | None = None) -> tuple[Bottleneck, dict]:
    """Train a bottleneck at ``cfg.boundary`` by distillation from the frozen ``staged`` model (no labels).

    Phase 1 trains encoder and decoder without rounding; the quantizer's per-channel ranges are then
    calibrated on the training latents; phase 2 fine-tunes with rounding in the loop (straight-through).
    Finally the per-channel symbol tables are fitted. ``init`` starts from another bottleneck's encoder and
    decoder (same architecture, any bit width). Returns the bottleneck (eval mode) and a report.
    """
    dcfg = dcfg or DistillConfig()
    t_start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if dcfg.threads:
        torch.set_num_threads(dcfg.threads)
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
    m = match_boundary(staged, k)
    feats = _features(staged, x_train, k)
    nonneg = bool(feats.min() >= 0)
    bn = Bottleneck(cfg, nonneg)
    if init is not None:
        keep = {k: v for k, v in init.state_dict().items() if k.startswith(("encoder.", "decoder."))}
        bn.load_state_dict(keep, strict=False)
    tgt_feat = tgt_logits = torch.empty(0)
    if dcfg.epochs_float + dcfg.epochs_qat > 0:  # teacher targets are needed only to train
        with torch.no_grad():
            tgt_feat = torch.cat([staged.run(feats[i : i + 512].clone(), k, m) for i in range(0, len(feats), 512)])
            tgt_logits = torch.cat([staged.run(tgt_feat[i : i + 512].clone(), m, n)
                                    for i in range(0, len(feats), 512)])
    feat_scale = float(tgt_feat.pow(2).mean()) if tgt_feat.numel() else 1.0
    history = []
    total_epochs = dcfg.epochs_float + dcfg.epochs_qat
    steps_per_epoch = math.ceil(len(feats) / dcfg.batch_size)
    bar = progress_bar(total=total_epochs * steps_per_epoch, desc=f"bottleneck@{k}", enabled=progress,
                       leave=False)
    T = dcfg.temperature
    try:
        for phase, epochs in (("float", dcfg.epochs_float), ("qat", dcfg.epochs_qat)):
            if epochs <= 0:
                continue
            if phase == "qat":
                bn.eval()
                bn.quantizer.calibrate(bn.latents(feats))
            bn.quantize = phase == "qat"
            lr = dcfg.lr if phase == "float" else dcfg.lr / 2
            opt = torch.optim.AdamW(bn.parameters(), lr=lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
            for epoch in range(epochs):
                bn.train()
                total, count = 0.0, 0
                for idx in _batches(len(feats), dcfg.batch_size, gen):
                    s_feat = staged.run(bn(feats[idx]).clone(), k, m)  # a stage may begin in place
                    s_logits = staged.run(s_feat.clone(), m, n) if m < n else s_feat
                    loss_f = F.mse_loss(s_feat, tgt_feat[idx]) / feat_scale
                    loss_o = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(tgt_logits[idx] / T, 1),
                                      reduction="batchmean") * T * T
                    loss = dcfg.feature_weight * loss_f + loss_o
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
                    bar.update(1)
                history.append({"phase": phase, "epoch": epoch + 1, "loss": round(total / count, 5)})
        bn.eval()
        bn.quantize = True
        sym = bn.calibrate(feats, ranges=dcfg.epochs_qat <= 0)  # QAT calibrated its ranges before fine-tuning
        tables = bn.tables.numpy()
    finally:
        bar.close()
        torch.set_num_threads(prev_threads)
    report = {
        "boundary": k, "match_boundary": m, "train_images": len(x_train), "nonneg": nonneg,
        "history": history, "train_seconds": round(time.perf_counter() - t_start, 1),
        "train_bits_per_sample": round(cross_entropy_bits(sym, tables), 2),
        "config": cfg.to_params(), "distill": asdict(dcfg),
    }
    return bn, report


def requantize(bn: Bottleneck, bits: int, feats: torch.Tensor) -> Bottleneck:
    """A copy of ``bn`` quantized at ``bits`` instead (post-training: ranges and tables re-fitted on ``feats``)."""
    cfg = BottleneckConfig(**{**asdict(bn.cfg), "bits": bits})
    out = Bottleneck(cfg, nonneg=bool(bn.nonneg_flag.item() > 0.5))
    state = {k: v for k, v in bn.state_dict().items() if not k.startswith("quantizer.") and k != "tables"}
    out.load_state_dict(state, strict=False)
    out.eval()
    out.calibrate(feats)
    return out
