"""Feature codecs: what turns the split tensor into bytes on the wire and back.

Interface (every codec, including the learned bottleneck and entropy coders of later work)::

    payload, meta = codec.encode(tensor)      # bytes, flat dict of str -> int | float | str | bool
    tensor = codec.decode(payload, meta)

``meta`` is small and travels in the request's ``parameters`` (prefixed ``codec.``); ``payload`` travels as
raw bytes. ``decode`` validates lengths and refuses truncated, oversized or garbled payloads with
:class:`~splitinfer.errors.InvalidInput`.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from splitinfer.errors import InvalidInput

Meta = dict[str, int | float | str | bool]
MAX_ELEMENTS = 1 << 28  # 256 M values (1 GiB as float32): far above any split tensor, far below overflow


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


def shape_to_str(shape) -> str:
    """``[1, 48, 14, 14]`` -> ``"1,48,14,14"`` (shapes travel as strings in parameters)."""
    return ",".join(str(int(s)) for s in shape)


def shape_from_str(text: object) -> list[int]:
    """Parse ``"1,48,14,14"``; raises InvalidInput on anything else."""
    if not isinstance(text, str) or not text:
        raise InvalidInput(f"codec shape must be a string like '1,48,14,14', got {text!r}")
    try:
        dims = [int(p) for p in text.split(",")]
    except ValueError:
        raise InvalidInput(f"codec shape {text!r} is not a comma-separated list of integers") from None
    if any(d <= 0 for d in dims) or len(dims) > 8:
        raise InvalidInput(f"codec shape {text!r} must have 1..8 positive dimensions")
    if math.prod(dims) > MAX_ELEMENTS:
        raise InvalidInput(f"codec shape {text!r} has more than {MAX_ELEMENTS} elements")
    return dims


class Float32Codec:
    """No compression: little-endian float32 bytes (the baseline every figure is compared with)."""

    name = "float32"

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, Meta]:
        arr = tensor.detach().to(torch.float32).contiguous().numpy()
        return arr.astype("<f4", copy=False).tobytes(), {"shape": shape_to_str(arr.shape)}

    def decode(self, payload: bytes, meta: Meta) -> torch.Tensor:
        shape = shape_from_str(meta.get("shape"))
        expected = 4 * math.prod(shape)
        if len(payload) != expected:
            raise InvalidInput(f"float32 payload has {len(payload)} bytes, shape {shape} needs {expected}")
        return torch.from_numpy(np.frombuffer(payload, dtype="<f4").reshape(shape).astype(np.float32))


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
    min_values_per_channel = 16

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, Meta]:
        x = tensor.detach().to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise InvalidInput("cannot encode features holding NaN or infinite values")
        if x.ndim < 2:
            raise InvalidInput(f"uint8-affine needs a tensor with a channel dimension, got shape {list(x.shape)}")
        c = x.shape[1]
        per_channel_values = x[0, 0].numel()
        granularity = "channel" if per_channel_values >= self.min_values_per_channel else "tensor"
        groups = c if granularity == "channel" else 1
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
        shape = shape_from_str(meta.get("shape"))
        if len(shape) < 2:
            raise InvalidInput(f"uint8-affine shape {shape} has no channel dimension")
        granularity = meta.get("granularity", "channel")
        if granularity not in ("channel", "tensor"):
            raise InvalidInput(f"uint8-affine granularity must be 'channel' or 'tensor', got {granularity!r}")
        groups = shape[1] if granularity == "channel" else 1
        numel = math.prod(shape)
        expected = 8 * groups + numel
        if len(payload) != expected:
            kind = "truncated" if len(payload) < expected else "oversized"
            raise InvalidInput(f"{kind} uint8-affine payload: {len(payload)} bytes, shape {shape} needs {expected}")
        lo = np.frombuffer(payload, dtype="<f4", count=groups, offset=0)
        scale = np.frombuffer(payload, dtype="<f4", count=groups, offset=4 * groups)
        if not (np.isfinite(lo).all() and np.isfinite(scale).all()):
            raise InvalidInput("garbled uint8-affine payload: non-finite channel minimum or scale")
        q = np.frombuffer(payload, dtype=np.uint8, offset=8 * groups).reshape(shape)
        view = [1, groups] + [1] * (len(shape) - 2)
        out = q.astype(np.float32) * scale.reshape(view).astype(np.float32) + lo.reshape(view).astype(np.float32)
        return torch.from_numpy(out)


CODECS: dict[str, type] = {c.name: c for c in (Float32Codec, UInt8AffineCodec)}


def get_codec(name: str) -> Codec:
    """A codec instance by name; raises InvalidInput for an unknown name."""
    try:
        return CODECS[name]()
    except KeyError:
        raise InvalidInput(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
