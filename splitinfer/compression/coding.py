"""Coded weights: a weight tensor stored as symbols into a codebook, entropy coded, in a safetensors file.

Every weight-sharing method (Deep Compression's k-means clusters, ternary, binary, uniform b-bit) ends with a
layer whose every value is ``codebook[group, symbol]``: ``symbol`` in ``0..2**bits-1`` per weight, ``group``
the output channel (per-channel codebooks, ``groups == out_channels``) or 0 (one codebook per layer). Such a
layer is stored as

* ``NAME::payload``  uint8: the symbols in C order, coded by :class:`splitinfer.entropy.SymbolCoder` (ANS over
  the layer's own symbol frequencies, or raw bit-packing), with that payload's header and CRC32;
* ``NAME::codebook`` float32 ``[groups, 2**bits]``, or ``NAME::scales`` float32 ``[groups]`` for a symmetric
  uniform grid (:func:`symmetric_codebook` rebuilds the codebook);
* ``NAME::table``    float32 ``[1, 2**bits]``: the ANS probability table (absent for raw packing).

Pruned weights are the symbol whose codebook value is 0 (Deep Compression keeps symbol 0 for them), so the
sparse positions are coded in the same ANS stream as the cluster indices: the cost of a position is the
information of "pruned or not", as with Han et al.'s relative-index coding for independent positions.
Tensors that are not coded (batch-norm parameters, biases, layers left in full precision) are stored as they
are. The safetensors metadata holds the recipe of each coded tensor (shape, bits, groups, coder) and a sha256
over the metadata and every tensor's bytes; :func:`decode_state` checks all of it before building anything,
so a corrupted or truncated file is refused with :class:`~splitinfer.errors.BundleError`, never decoded into
a silently different model. Decoded weights are bit-exact: the same float32 codebook values the evaluated
model used (:func:`shared_weight` builds them the same way).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from splitinfer.entropy import SymbolCoder, fit_tables
from splitinfer.errors import BundleError, InvalidInput

CODING_KEY = "splitinfer.coding"
DIGEST_KEY = "splitinfer.sha256"
CODING_FORMAT = "splitinfer-coded-weights-v1"
SEP = "::"
MAX_CODED_ELEMENTS = 1 << 28


@dataclass
class CodedTensor:
    """One weight as symbols into a codebook (``value = codebook[group, symbol]``)."""

    symbols: torch.Tensor
    """Integer symbols, the weight's shape."""
    codebook: torch.Tensor
    """float32 ``[groups, 2**bits]``; groups is 1 or the weight's first dimension."""
    bits: int
    scales: torch.Tensor | None = None
    """For a symmetric uniform grid: the per-group scales the codebook was built from
    (:func:`symmetric_codebook`); stored instead of the codebook (one float per channel, not ``2**bits``)."""

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be 1..8, got {self.bits}")
        g, k = self.codebook.shape
        if k != 1 << self.bits or g not in (1, self.symbols.shape[0]):
            raise ValueError(f"codebook {list(self.codebook.shape)} does not fit {self.bits} bits and weight "
                             f"{list(self.symbols.shape)}")

    def values(self) -> torch.Tensor:
        """The float32 weight (exactly what the evaluated model used)."""
        return shared_weight(self.symbols, self.codebook)


def symmetric_codebook(scales: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 ``[groups, 2**bits]``: ``scale * k`` for ``k = -q..q`` (``q = 2**(bits-1) - 1``), then one unused 0
    entry. The uniform quantizer and the decoder both build their codebooks here, so decoding is bit-exact."""
    q = (1 << (bits - 1)) - 1
    grid = torch.arange(-q, q + 1, dtype=torch.float32)
    book = scales.to(torch.float32)[:, None] * grid[None, :]
    return torch.cat([book, torch.zeros(len(scales), 1)], 1)


def shared_weight(symbols: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[group, symbol]`` for every weight (group = output channel, or 0 for a single codebook)."""
    g = codebook.shape[0]
    flat = symbols.reshape(symbols.shape[0], -1).long()
    if g == 1:
        return codebook[0][flat].reshape(symbols.shape)
    return torch.gather(codebook, 1, flat).reshape(symbols.shape)


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in sorted(meta.items()) if k != DIGEST_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def encode_state(state: dict[str, torch.Tensor], coded: dict[str, CodedTensor], coder: str = "ans",
                 extra: dict[str, str] | None = None) -> bytes:
    """A safetensors file (bytes) holding ``state`` with the tensors named in ``coded`` stored coded.

    ``coded[name].values()`` must equal ``state[name]`` exactly (the caller's model runs on those values)."""
    tensors: dict[str, torch.Tensor] = {}
    recipe: dict[str, dict] = {}
    for name, value in state.items():
        if SEP in name:
            raise ValueError(f"tensor name {name!r} contains {SEP!r}")
        c = coded.get(name)
        if c is None:
            tensors[name] = value.detach().contiguous()
            continue
        if list(c.symbols.shape) != list(value.shape) or not torch.equal(c.values(), value.detach().float()):
            raise ValueError(f"coded {name} does not reproduce the model's weight exactly")
        sym = c.symbols.detach().to(torch.int64).reshape(1, 1, -1).numpy().astype(np.uint8)
        levels = 1 << c.bits
        table = fit_tables(sym, levels) if coder == "ans" else None
        payload = SymbolCoder([1, sym.shape[2]], c.bits, table, coder=coder, max_batch=1).encode(sym)
        tensors[name + SEP + "payload"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        grid = "codebook"
        if c.scales is not None:
            if not torch.equal(symmetric_codebook(c.scales, c.bits), c.codebook):
                raise ValueError(f"coded {name}: codebook is not the symmetric grid of its scales")
            tensors[name + SEP + "scales"] = c.scales.detach().to(torch.float32).contiguous()
            grid = "symmetric"
        else:
            tensors[name + SEP + "codebook"] = c.codebook.detach().to(torch.float32).contiguous()
        if table is not None:
            tensors[name + SEP + "table"] = torch.from_numpy(table)
        recipe[name] = {"shape": list(value.shape), "bits": c.bits, "groups": int(c.codebook.shape[0]),
                        "coder": coder, "grid": grid}
    missing = set(coded) - set(state)
    if missing:
        raise ValueError(f"coded tensors not in the state: {sorted(missing)}")
    meta = {CODING_KEY: json.dumps({"format": CODING_FORMAT, "tensors": recipe}, sort_keys=True), **(extra or {})}
    meta[DIGEST_KEY] = _digest(meta, tensors)
    return safetensors_save(tensors, metadata=meta)


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise BundleError(f"coded weights: truncated file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= len(data) - 8:
        raise BundleError("coded weights: truncated or corrupted safetensors header")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"coded weights: corrupted safetensors header ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BundleError("coded weights: the safetensors header carries no splitinfer metadata")
    return meta


def is_coded(data: bytes) -> bool:
    """True when ``data`` is a safetensors file written by :func:`encode_state` (coded weights)."""
    try:
        return CODING_KEY in _metadata(data)
    except BundleError:
        return False


def decode_state(data: bytes, max_elements: int = MAX_CODED_ELEMENTS) -> dict[str, torch.Tensor]:
    """The float state dict stored by :func:`encode_state` in ``data``. Raises BundleError (naming what is wrong)
    for anything truncated, corrupted or inconsistent; no allocation is sized by the file before its digest and
    recipe have been checked (coded tensors hold at most ``max_elements`` values in all)."""
    meta = _metadata(data)
    try:
        tensors = safetensors_load(bytes(data))
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        raise BundleError(f"coded weights: cannot read the safetensors body (corrupted or truncated?): {exc}") from None
    if meta.get(DIGEST_KEY) != _digest(meta, tensors):
        raise BundleError("coded weights: sha256 does not match the file's contents (corrupted)")
    try:
        recipe = json.loads(meta[CODING_KEY])
        if recipe.get("format") != CODING_FORMAT:
            raise BundleError(f"coded weights: format {recipe.get('format')!r}, this build reads {CODING_FORMAT}")
        entries = recipe["tensors"]
        if not isinstance(entries, dict):
            raise TypeError("tensors must be an object")
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise BundleError(f"coded weights: malformed recipe ({type(exc).__name__}: {exc})") from None
    total = 0
    state = {k: v for k, v in tensors.items() if SEP not in k}
    for name, r in sorted(entries.items()):
        try:
            shape = [int(d) for d in r["shape"]]
            bits, groups, coder = int(r["bits"]), int(r["groups"]), str(r["coder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"coded weights: malformed recipe for {name} ({exc})") from None
        n = int(np.prod(shape)) if shape else 1
        total += n
        if not shape or min(shape) < 1 or total > max_elements or not 1 <= bits <= 8:
            raise BundleError(f"coded weights: {name} has an impossible shape {shape} or bits {bits}")
        if groups not in (1, shape[0]):
            raise BundleError(f"coded weights: {name} has {groups} codebooks for {shape[0]} output channels")
        payload = tensors.get(name + SEP + "payload")
        codebook = tensors.get(name + SEP + "codebook")
        table = tensors.get(name + SEP + "table")
        if r.get("grid") == "symmetric":
            scales = tensors.get(name + SEP + "scales")
            if scales is None or scales.dtype != torch.float32 or list(scales.shape) != [groups] or bits < 2:
                raise BundleError(f"coded weights: {name} lacks its {groups} scales (or has {bits} bits)")
            codebook = symmetric_codebook(scales, bits)
        elif r.get("grid", "codebook") != "codebook":
            raise BundleError(f"coded weights: {name} has an unknown grid {r.get('grid')!r}")
        if payload is None or codebook is None or payload.dtype != torch.uint8 or codebook.dtype != torch.float32:
            raise BundleError(f"coded weights: {name} lacks its payload or codebook")
        if list(codebook.shape) != [groups, 1 << bits] or not torch.isfinite(codebook).all():
            raise BundleError(f"coded weights: {name} codebook is {list(codebook.shape)}, not [{groups}, {1 << bits}] "
                              "finite values")
        if coder == "ans" and (table is None or list(table.shape) != [1, 1 << bits]):
            raise BundleError(f"coded weights: {name} lacks its probability table")
        try:
            coder_ = SymbolCoder([1, n], bits, table.numpy() if coder == "ans" else None, coder=coder, max_batch=1)
            sym = coder_.decode(payload.numpy().tobytes())
        except (InvalidInput, ValueError) as exc:
            raise BundleError(f"coded weights: {name}: {exc}") from None
        state[name] = shared_weight(torch.from_numpy(sym.astype(np.int64)).reshape(shape), codebook)
    return state
