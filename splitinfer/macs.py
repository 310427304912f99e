"""Multiply-accumulates of whatever a piece of torch code runs, counted at the ATen level.

:class:`MacCounter` is a dispatch mode: every matrix product the code reaches (convolutions, transposed
convolutions, ``mm``/``addmm``/``bmm``/``baddbmm`` behind ``Linear``, ``matmul`` and ``einsum``, matrix-vector
products and the fused scaled-dot-product attention kernels) adds its multiply-accumulates to ``macs``. So the
attention products of a transformer count as well as its projections, whichever module or function computes them.
Element-wise arithmetic (additions, activations, normalisation, softmax) is not counted: it is no
multiply-accumulate, and the published figures this is compared with (torchvision's ``_ops``) leave it out too.

``nn.MultiheadAttention``'s inference fast path (one fused ATen op) is switched off while counting
(:func:`counting_macs`), so its projections and attention are seen as the products they are.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _conv(args, out) -> int:
    weight, transposed = args[1], bool(args[6]) if len(args) > 6 else False
    kernel = _numel(weight.shape[2:])
    if transposed:  # every input element meets (out channels / groups) x kernel weights
        return _numel(args[0].shape) * int(weight.shape[1]) * kernel
    return _numel(out.shape) * int(weight.shape[1]) * kernel


def _mm(args, out) -> int:
    a, b = args[0], args[1]
    return int(a.shape[0]) * int(a.shape[1]) * int(b.shape[1])


def _addmm(args, out) -> int:
    return _mm(args[1:], out)


def _bmm(args, out) -> int:
    a, b = args[0], args[1]
    return int(a.shape[0]) * int(a.shape[1]) * int(a.shape[2]) * int(b.shape[2])


def _baddbmm(args, out) -> int:
    return _bmm(args[1:], out)


def _mv(args, out) -> int:
    return _numel(args[0].shape)


def _addmv(args, out) -> int:
    return _numel(args[1].shape)


def _dot(args, out) -> int:
    return _numel(args[0].shape)


def _sdpa(args, out) -> int:
    """q [..., L, E], k [..., S, E], v [..., S, Ev]: q k^T then softmax(.) v."""
    q, k, v = args[0], args[1], args[2]
    batch = _numel(q.shape[:-2])
    length, e, s, ev = int(q.shape[-2]), int(q.shape[-1]), int(k.shape[-2]), int(v.shape[-1])
    return batch * length * s * (e + ev)


_COUNTED = {
    aten.convolution.default: _conv,
    aten._convolution.default: _conv,
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.bmm.default: _bmm,
    aten.baddbmm.default: _baddbmm,
    aten.mv.default: _mv,
    aten.addmv.default: _addmv,
    aten.dot.default: _dot,
    aten.vdot.default: _dot,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _sdpa,
    aten._scaled_dot_product_flash_attention.default: _sdpa,
    aten._scaled_dot_product_efficient_attention.default: _sdpa,
    aten._scaled_dot_product_cudnn_attention.default: _sdpa,
}


class MacCounter(TorchDispatchMode):
    """Counts the multiply-accumulates of the ATen products run under it (``macs``, for the whole batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        count = _COUNTED.get(func)
        if count is not None:
            self.macs += count(args, out)
        return out


_FASTPATH_LOCK = threading.Lock()
_FASTPATH_USERS = 0
_FASTPATH_PREVIOUS = True


@contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """``nn.MultiheadAttention``'s fused inference fast path off for the ``with`` block, so its projections and
    attention products run as ordinary ATen ops (to be counted, or exported to ONNX, which has no fused op).

    The switch is process-wide: overlapping blocks (stagings in several threads) share one reference count, so
    it is restored once, by the last block to finish, to what it was before the first."""
    global _FASTPATH_USERS, _FASTPATH_PREVIOUS
    with _FASTPATH_LOCK:
        if _FASTPATH_USERS == 0:
            _FASTPATH_PREVIOUS = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _FASTPATH_USERS += 1
    try:
        yield
    finally:
        with _FASTPATH_LOCK:
            _FASTPATH_USERS -= 1
            if _FASTPATH_USERS == 0:
                torch.backends.mha.set_fastpath_enabled(_FASTPATH_PREVIOUS)


@contextmanager
def counting_macs() -> Iterator[MacCounter]:
    """A :class:`MacCounter` active for the ``with`` block, with ``nn.MultiheadAttention``'s fused fast path off
    (:func:`mha_fastpath_disabled`)."""
    with mha_fastpath_disabled(), MacCounter() as counter:
        yield counter
