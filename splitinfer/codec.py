"""Feature codecs: what turns the split tensor into bytes on the wire and back.

Interface (every codec, including the learned bottleneck and entropy coders of later work)::

    payload, meta = codec.encode(tensor)      # bytes, flat dict of str -> int | float | str | bool
    tensor = codec.decode(payload, meta)

``meta`` is small and travels in the request's ``parameters`` (prefixed ``codec.``); ``payload`` travels as
raw bytes. ``decode`` validates lengths and refuses truncated, oversized or garbled payloads with
:class:`~splitinfer.errors.InvalidInput`.

The wire format's helpers and constants (shape strings, the size bound, uint8-affine's per-channel threshold) and
the decoders live in the torch-free :mod:`splitinfer.codec_numpy`, beside the numpy encoders the torch-free edge
uses; the torch codecs here import them, so the two cannot drift.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from splitinfer.codec_numpy import (  # noqa: F401 - MAX_ELEMENTS and the shape helpers are re-exported
    MAX_ELEMENTS,
    UINT8_MIN_VALUES_PER_CHANNEL,
    Meta,
    decode_float32,
    decode_uint8_affine,
    encode_float32,
    shape_from_str,
    shape_to_str,
    uint8_granularity,
)
from splitinfer.errors import InvalidInput
from splitinfer.finite import all_finite
from splitinfer.plan import GENERIC_CODECS


@runtime_checkable
class Codec(Protocol):
    """Encodes a float tensor ``[B, ...]`` into bytes plus small metadata, and back."""

    name: str

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, Meta]:
        """Tensor -> (payload, meta)."""
        ...

    def decode(self, payload: bytes, meta: Meta) -> torch.Tensor:
        """(payload, meta) -> float32 tensor of the encoded shape."""
        ...


class Float32Codec:
    """No compression: little-endian float32 bytes (the baseline every figure is compared with)."""

    name = "float32"

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, Meta]:
        return encode_float32(tensor.detach().to(torch.float32).contiguous().numpy())

    def decode(self, payload: bytes, meta: Meta) -> torch.Tensor:
        return torch.from_numpy(decode_float32(payload, meta))


class UInt8AffineCodec:
    """Per-channel affine quantization to uint8.

    Channel ``c`` (dimension 1) is mapped from ``[min_c, max_c]`` onto ``0..255``. The payload is ``G``
    float32 minima, ``G`` float32 scales, then the uint8 values in C order; ``meta`` holds the shape and the
    granularity. ``G`` is the channel count, except where a channel holds fewer than
    :attr:`min_values_per_channel` values per sample (pooled vectors, ``[B, C]`` features): there 8 bytes of
    range per channel would cost more than the values themselves, so one range covers the whole tensor
    (``granularity = "tensor"``, ``G = 1``).
    """

    name = "uint8-affine"
    min_values_per_channel = UINT8_MIN_VALUES_PER_CHANNEL

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, Meta]:
        x = tensor.detach().to(torch.float32)
        if not all_finite(x):
            raise InvalidInput("cannot encode features holding NaN or infinite values")
        if x.ndim < 2:
            raise InvalidInput(f"uint8-affine needs a tensor with a channel dimension, got shape {list(x.shape)}")
        granularity = uint8_granularity(x.shape)
        groups = x.shape[1] if granularity == "channel" else 1
        flat = x.transpose(0, 1).reshape(groups, -1)
        lo = flat.amin(dim=1)
        hi = flat.amax(dim=1)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        view = [1, groups] + [1] * (x.ndim - 2)
        q = torch.round((x - lo.view(view)) / scale.view(view)).clamp_(0, 255).to(torch.uint8)
        payload = b"".join([lo.numpy().astype("<f4").tobytes(), scale.numpy().astype("<f4").tobytes(),
                            q.contiguous().numpy().tobytes()])
        return payload, {"shape": shape_to_str(x.shape), "granularity": granularity}

    def decode(self, payload: bytes, meta: Meta) -> torch.Tensor:
        return torch.from_numpy(decode_uint8_affine(payload, meta))

    def roundtrip_each(self, tensor: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` of every sample of ``tensor`` encoded alone (as the edge sends them), for a
        whole batch at once: the same float32 arithmetic per sample, so the same values (planning evaluates
        the deployed system on thousands of samples with it)."""
        x = tensor.detach().to(torch.float32)
        if x.ndim < 2:
            raise InvalidInput(f"uint8-affine needs a tensor with a channel dimension, got shape {list(x.shape)}")
        b = x.shape[0]
        groups = x.shape[1] if uint8_granularity(x[:1].shape) == "channel" else 1
        flat = x.reshape(b, groups, -1)
        lo, hi = flat.amin(dim=2), flat.amax(dim=2)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        view = [b, groups] + [1] * (x.ndim - 2) if groups > 1 else [b] + [1] * (x.ndim - 1)
        lo, scale = lo.view(view), scale.view(view)
        # in place: the values stay integers 0..255 held in float32, so skipping the uint8 cast changes nothing
        q = torch.sub(x, lo).div_(scale).round_().clamp_(0, 255)
        return q.mul_(scale).add_(lo)


CODECS: dict[str, type] = {c.name: c for c in (Float32Codec, UInt8AffineCodec)}
if tuple(CODECS) != GENERIC_CODECS:  # the torch-free plan schema names them too
    raise ImportError(f"splitinfer.plan.GENERIC_CODECS {GENERIC_CODECS} != codec classes {tuple(CODECS)}")


def get_codec(name: str) -> Codec:
    """A codec instance by name; raises InvalidInput for an unknown name."""
    try:
        return CODECS[name]()
    except KeyError:
        raise InvalidInput(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
