"""Feature codecs in numpy (no torch), beside the torch codecs of :mod:`splitinfer.codec`.

The torch-free edge encodes with these; the torch codecs import their constants and helpers from here (the
wire format's shape strings, the size bound, uint8-affine's per-channel threshold, the decoders), so the two
cannot drift. Same interface as the torch codecs, on numpy arrays::

    codec = numpy_codec("uint8-affine")          # or "float32", or "bottleneck" with its latent function
    payload, meta = codec.encode(h)              # h: float32 numpy [B, ...]: the same bytes as the torch codec

``float32`` and ``uint8-affine`` do the torch codecs' float32 arithmetic, so given the same tensor they give the
same payload bytes. The learned codec's encoder network is not numpy: :class:`LearnedEncoder` takes it as a
function (the exported encoder on ONNX Runtime, :meth:`edge_agent.onnx_head.OnnxHead.latent`), then rounds,
clips and entropy-codes with :class:`splitinfer.entropy.SymbolCoder` as
:meth:`splitinfer.bottleneck.LearnedCodec.encode` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from splitinfer.errors import InvalidInput
from splitinfer.plan import GENERIC_CODECS, LEARNED_CODECS

Meta = dict[str, int | float | str | bool]
MAX_ELEMENTS = 1 << 28  # 256 M values (1 GiB as float32): far above any split tensor, far below overflow
UINT8_MIN_VALUES_PER_CHANNEL = 16
"""uint8-affine keeps one range per channel when a channel holds at least this many values per sample, else one
range for the whole tensor (see :class:`splitinfer.codec.UInt8AffineCodec`)."""


@runtime_checkable
class NumpyEncoder(Protocol):
    """Encodes a float32 numpy array ``[B, ...]`` into bytes plus small metadata (the torch codecs' format)."""

    name: str

    def encode(self, h: np.ndarray) -> tuple[bytes, Meta]:
        """Array -> (payload, meta)."""
        ...


# ---------------------------------------------------------------------------------------------- shapes


def shape_to_str(shape: Sequence[int]) -> str:
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


# ---------------------------------------------------------------------------------------------- float32


def encode_float32(h: np.ndarray) -> tuple[bytes, Meta]:
    """Little-endian float32 bytes of ``h`` and its shape."""
    arr = np.ascontiguousarray(h, dtype=np.float32)
    return arr.astype("<f4", copy=False).tobytes(), {"shape": shape_to_str(arr.shape)}


def decode_float32(payload: bytes, meta: Meta) -> np.ndarray:
    """The float32 array of a :func:`encode_float32` payload (a writable copy); InvalidInput on a bad length."""
    shape = shape_from_str(meta.get("shape"))
    expected = 4 * math.prod(shape)
    if len(payload) != expected:
        raise InvalidInput(f"float32 payload has {len(payload)} bytes, shape {shape} needs {expected}")
    return np.frombuffer(payload, dtype="<f4").reshape(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------- uint8-affine


def uint8_granularity(shape: Sequence[int]) -> str:
    """``"channel"`` when a channel of one sample holds at least :data:`UINT8_MIN_VALUES_PER_CHANNEL` values,
    else ``"tensor"``."""
    return "channel" if math.prod(shape[2:]) >= UINT8_MIN_VALUES_PER_CHANNEL else "tensor"


def encode_uint8_affine(h: np.ndarray) -> tuple[bytes, Meta]:
    """:class:`splitinfer.codec.UInt8AffineCodec` in numpy: the same float32 arithmetic, so the same bytes."""
    x = np.asarray(h, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput("cannot encode features holding NaN or infinite values")
    if x.ndim < 2:
        raise InvalidInput(f"uint8-affine needs a tensor with a channel dimension, got shape {list(x.shape)}")
    granularity = uint8_granularity(x.shape)
    groups = x.shape[1] if granularity == "channel" else 1
    flat = np.swapaxes(x, 0, 1).reshape(groups, -1)
    lo = flat.min(axis=1)
    hi = flat.max(axis=1)
    scale = (hi - lo) / np.float32(255.0)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    view = [1, groups] + [1] * (x.ndim - 2)
    q = np.clip(np.rint((x - lo.reshape(view)) / scale.reshape(view)), 0, 255).astype(np.uint8)
    payload = b"".join([lo.astype("<f4").tobytes(), scale.astype("<f4").tobytes(), np.ascontiguousarray(q).tobytes()])
    return payload, {"shape": shape_to_str(x.shape), "granularity": granularity}


def decode_uint8_affine(payload: bytes, meta: Meta) -> np.ndarray:
    """The float32 array of a uint8-affine payload; InvalidInput for a truncated, oversized or garbled one."""
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
    return q.astype(np.float32) * scale.reshape(view).astype(np.float32) + lo.reshape(view).astype(np.float32)


# ---------------------------------------------------------------------------------------------- codec objects


class Float32:
    """``float32`` on numpy arrays."""

    name = "float32"

    def encode(self, h: np.ndarray) -> tuple[bytes, Meta]:
        return encode_float32(h)

    def decode(self, payload: bytes, meta: Meta) -> np.ndarray:
        return decode_float32(payload, meta)


class UInt8Affine:
    """``uint8-affine`` on numpy arrays."""

    name = "uint8-affine"
    min_values_per_channel = UINT8_MIN_VALUES_PER_CHANNEL

    def encode(self, h: np.ndarray) -> tuple[bytes, Meta]:
        return encode_uint8_affine(h)

    def decode(self, payload: bytes, meta: Meta) -> np.ndarray:
        return decode_uint8_affine(payload, meta)


class LearnedEncoder:
    """The learned bottleneck's encode side without torch: ``latent(h)`` (the encoder network with batch norm and
    the quantizer's affine map folded in, e.g. the exported encoder on ONNX Runtime) gives the latent in
    quantizer units; round and clip to symbols, then :class:`splitinfer.entropy.SymbolCoder`."""

    name = LEARNED_CODECS[0]

    def __init__(self, latent: Callable[[np.ndarray], np.ndarray], latent_shape: Sequence[int], bits: int,
                 tables: np.ndarray | Sequence[Sequence[float]], coder: str = "ans"):
        from splitinfer.entropy import SymbolCoder

        self.latent = latent
        self.levels = 1 << int(bits)
        self.coder = SymbolCoder(list(latent_shape), int(bits), np.asarray(tables, dtype=np.float32), coder)

    def encode(self, h: np.ndarray) -> tuple[bytes, Meta]:
        u = self.latent(np.asarray(h, dtype=np.float32))
        if not math.isfinite(float(u.sum())):  # NaN/inf in the features propagate to the latent's sum
            raise InvalidInput("cannot encode features holding NaN or infinite values")
        sym = np.rint(np.clip(u, 0, self.levels - 1)).astype(np.uint8)
        return self.coder.encode(sym), {"v": 1}


NUMPY_CODECS: dict[str, type] = {c.name: c for c in (Float32, UInt8Affine)}
if tuple(NUMPY_CODECS) != GENERIC_CODECS:
    raise ImportError(f"splitinfer.plan.GENERIC_CODECS {GENERIC_CODECS} != numpy codecs {tuple(NUMPY_CODECS)}")


def numpy_codec(name: str, *, latent: Callable[[np.ndarray], np.ndarray] | None = None,
                latent_shape: Sequence[int] | None = None, bits: int | None = None,
                tables: np.ndarray | Sequence[Sequence[float]] | None = None, coder: str = "ans") -> NumpyEncoder:
    """A numpy codec by name: ``float32``, ``uint8-affine``, or the learned ``bottleneck`` (which needs its
    ``latent`` function, ``latent_shape``, ``bits`` and probability ``tables``). InvalidInput otherwise."""
    if name in NUMPY_CODECS:
        return NUMPY_CODECS[name]()
    if name == LearnedEncoder.name:
        if latent is None or latent_shape is None or bits is None or tables is None:
            raise InvalidInput(f"the {name} codec needs its encoder, latent shape, bits and tables")
        return LearnedEncoder(latent, latent_shape, bits, tables, coder)
    known = sorted([*NUMPY_CODECS, LearnedEncoder.name])
    raise InvalidInput(f"unknown codec {name!r} for the torch-free edge; known: {', '.join(known)}")
