"""Entropy coding of quantized symbols, and the versioned payload that carries them.

Symbols are small integers ``0..L-1`` (``L = 2**bits``) laid out ``[B, C, H, W]`` in C order. Three coders:

``ans``   asymmetric numeral systems (``constriction``'s stack coder) with one probability table per channel,
          fitted on calibration data and stored in the bundle; the rate approaches the tables' cross-entropy.
``zstd``  the symbols as bytes, compressed with zstandard: no tables needed, a simple alternative.
``raw``   the symbols bit-packed at ``bits`` bits each: the quantizer's rate without entropy coding.

Payload layout (version 1, 9-byte header, little endian)::

    magic 0x53 ('S') | version u8 | coder u8 | batch u16 | crc32 u32 | body

The CRC32 covers the first five header bytes and the body, so any flipped bit is caught (the batch field
included: an ANS stream decoded for the wrong sample count would not fail on its own).

Decoding checks the header, the CRC and the body length before allocating anything sized by the payload,
bounds every allocation by ``batch * symbols_per_sample`` (``batch <= max_batch``), and after ANS decoding
requires the coder to be exactly exhausted. A truncated, garbled or foreign payload raises
:class:`~splitinfer.errors.InvalidInput`; nothing else escapes.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from splitinfer.errors import InvalidInput

MAGIC = 0x53
PAYLOAD_VERSION = 1
HEADER = struct.Struct("<BBBHI")
CODERS = {"raw": 0, "ans": 1, "zstd": 2}
CODER_NAMES = {v: k for k, v in CODERS.items()}
MIN_PROBABILITY = 1e-6


def fit_tables(symbols: np.ndarray, levels: int, prior: float = 0.5) -> np.ndarray:
    """Per-channel symbol probabilities ``[C, levels]`` from calibration symbols ``[N, C, ...]``.

    ``prior`` pseudo-counts per symbol keep every probability positive, so any symbol stays encodable.
    """
    if symbols.ndim < 2:
        raise ValueError(f"symbols need shape [N, C, ...], got {symbols.shape}")
    c = symbols.shape[1]
    per_channel = np.moveaxis(symbols, 1, 0).reshape(c, -1).astype(np.int64)
    if per_channel.size and (per_channel.min() < 0 or per_channel.max() >= levels):
        raise ValueError(f"symbols outside 0..{levels - 1}")
    counts = np.stack([np.bincount(row, minlength=levels) for row in per_channel]).astype(np.float64) + prior
    probs = counts / counts.sum(axis=1, keepdims=True)
    probs = np.maximum(probs, MIN_PROBABILITY)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def cross_entropy_bits(symbols: np.ndarray, tables: np.ndarray) -> float:
    """Mean ideal code length (bits per sample) of ``symbols [N, C, ...]`` under ``tables`` (what ANS approaches)."""
    n, c = symbols.shape[:2]
    flat = np.moveaxis(symbols, 1, 0).reshape(c, -1)
    logp = np.log2(tables[np.arange(c)[:, None], flat])
    return float(-logp.sum() / n)


class SymbolCoder:
    """Encodes and decodes symbol arrays of a fixed per-sample shape ``[C, H, W]`` into versioned payloads."""

    def __init__(self, sample_shape: list[int], bits: int, tables: np.ndarray | None = None, coder: str = "ans",
                 max_batch: int = 1024):
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be 1..8, got {bits}")
        if coder not in CODERS:
            raise ValueError(f"unknown entropy coder {coder!r}; known: {', '.join(CODERS)}")
        if coder == "ans":
            if tables is None:
                raise ValueError("the ans coder needs per-channel probability tables")
            if tables.shape != (sample_shape[0], 1 << bits):
                raise ValueError(f"tables shape {tables.shape} does not match {sample_shape[0]} channels x "
                                 f"{1 << bits} levels")
            if not (np.isfinite(tables).all() and (tables > 0).all()):
                raise ValueError("probability tables must be finite and positive")
        self.sample_shape = [int(d) for d in sample_shape]
        self.bits = bits
        self.levels = 1 << bits
        self.coder = coder
        self.max_batch = max_batch
        self.per_sample = int(np.prod(self.sample_shape))
        if tables is not None:
            # one probability row per symbol of one sample, in C order (channel-major)
            spatial = self.per_sample // self.sample_shape[0]
            self._rows = np.ascontiguousarray(np.repeat(tables.astype(np.float32), spatial, axis=0))
        else:
            self._rows = None
        self._ans_model = None

    def _rows_for(self, batch: int) -> np.ndarray:
        return self._rows if batch == 1 else np.tile(self._rows, (batch, 1))

    # ---------------------------------------------------------------- encode

    def encode(self, symbols: np.ndarray) -> bytes:
        """``symbols [B, *sample_shape]`` (integers in ``0..levels-1``) -> payload."""
        if list(symbols.shape[1:]) != self.sample_shape:
            raise InvalidInput(f"symbols of shape {list(symbols.shape)} do not match [B, {self.sample_shape}]")
        batch = symbols.shape[0]
        if not 1 <= batch <= min(self.max_batch, 0xFFFF):
            raise InvalidInput(f"batch {batch} outside 1..{min(self.max_batch, 0xFFFF)}")
        flat = symbols.reshape(-1)
        if (flat.dtype != np.uint8 and flat.min() < 0) or flat.max() >= self.levels:
            raise InvalidInput(f"symbols outside 0..{self.levels - 1}")
        if self.coder == "raw":
            body = self._pack(flat.astype(np.uint8))
        elif self.coder == "zstd":
            body = _zstd().ZstdCompressor(level=19).compress(flat.astype(np.uint8).tobytes())
        else:
            import constriction

            enc = constriction.stream.stack.AnsCoder()
            enc.encode_reverse(flat.astype(np.int32), self._model(), self._rows_for(batch))
            body = enc.get_compressed().tobytes()  # uint32 words, little endian on every supported machine
        head = HEADER.pack(MAGIC, PAYLOAD_VERSION, CODERS[self.coder], batch, 0)[:5]
        return head + zlib.crc32(body, zlib.crc32(head)).to_bytes(4, "little") + body

    def _pack(self, flat: np.ndarray) -> bytes:
        bits = np.unpackbits(flat[:, None], axis=1, count=8, bitorder="little")[:, : self.bits]
        return np.packbits(bits.reshape(-1), bitorder="little").tobytes()

    def _model(self):
        if self._ans_model is None:
            import constriction

            self._ans_model = constriction.stream.model.Categorical(perfect=False)
        return self._ans_model

    # ---------------------------------------------------------------- decode

    def decode(self, payload: bytes) -> np.ndarray:
        """payload -> ``symbols [B, *sample_shape]`` as uint8; InvalidInput on anything malformed."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidInput(f"payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) < HEADER.size:
            raise InvalidInput(f"truncated codec payload: {len(payload)} bytes, the header alone needs {HEADER.size}")
        magic, version, coder, batch, crc = HEADER.unpack_from(payload)
        if magic != MAGIC:
            raise InvalidInput("not a splitinfer bottleneck payload (bad magic byte)")
        if version != PAYLOAD_VERSION:
            raise InvalidInput(f"bottleneck payload version {version}; this build reads version {PAYLOAD_VERSION}")
        if CODER_NAMES.get(coder) != self.coder:
            raise InvalidInput(f"payload uses entropy coder {CODER_NAMES.get(coder, coder)!r}, this codec "
                               f"expects {self.coder!r}")
        if not 1 <= batch <= self.max_batch:
            raise InvalidInput(f"payload batch {batch} outside 1..{self.max_batch}")
        body = payload[HEADER.size:]
        if zlib.crc32(body, zlib.crc32(payload[:5])) != crc:
            raise InvalidInput("garbled or truncated codec payload: CRC32 mismatch")
        n = batch * self.per_sample
        if self.coder == "raw":
            flat = self._unpack(body, n)
        elif self.coder == "zstd":
            flat = self._unzstd(body, n)
        else:
            flat = self._unans(body, batch, n)
        return flat.reshape(batch, *self.sample_shape)

    def _unpack(self, body: bytes, n: int) -> np.ndarray:
        expected = (n * self.bits + 7) // 8
        if len(body) != expected:
            raise InvalidInput(f"raw payload body has {len(body)} bytes, {expected} expected")
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8), bitorder="little", count=n * self.bits)
        weights = (1 << np.arange(self.bits)).astype(np.uint16)
        return (bits.reshape(n, self.bits).astype(np.uint16) @ weights).astype(np.uint8)

    def _unzstd(self, body: bytes, n: int) -> np.ndarray:
        zstd = _zstd()
        try:
            raw = zstd.ZstdDecompressor().decompress(body, max_output_size=n)
        except zstd.ZstdError as exc:
            raise InvalidInput(f"garbled zstd payload: {exc}") from None
        if len(raw) != n:
            raise InvalidInput(f"zstd payload holds {len(raw)} symbols, {n} expected")
        flat = np.frombuffer(raw, dtype=np.uint8)
        if flat.max(initial=0) >= self.levels:
            raise InvalidInput(f"zstd payload holds symbols outside 0..{self.levels - 1}")
        return flat

    def _unans(self, body: bytes, batch: int, n: int) -> np.ndarray:
        import constriction

        if len(body) % 4:
            raise InvalidInput(f"ans payload body has {len(body)} bytes, not a whole number of 32-bit words")
        words = np.frombuffer(body, dtype=np.uint32)
        dec = constriction.stream.stack.AnsCoder(words)
        try:
            flat = dec.decode(self._model(), self._rows_for(batch))
        except Exception as exc:  # constriction raises ValueError/AssertionError on inconsistent streams
            raise InvalidInput(f"garbled ans payload: {exc}") from None
        if not dec.is_empty():
            raise InvalidInput("garbled ans payload: bits left over after decoding every symbol")
        if len(flat) != n:
            raise InvalidInput(f"ans payload decoded {len(flat)} symbols, {n} expected")
        return flat.astype(np.uint8)


def _zstd():
    import zstandard

    return zstandard
