"""Entropy coding and the versioned symbol payload: round trips, rates, and refusal of damaged payloads."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from splitinfer.entropy import HEADER, SymbolCoder, cross_entropy_bits, fit_tables
from splitinfer.errors import InvalidInput

SHAPE = [4, 7, 7]


def skewed_symbols(n: int, bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    levels = 1 << bits
    p = np.geomspace(1.0, 0.02, levels)
    return rng.choice(levels, size=(n, *SHAPE), p=p / p.sum()).astype(np.uint8)


@pytest.mark.parametrize("coder", ["ans", "zstd", "raw"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_round_trip(coder, bits):
    sym = skewed_symbols(3, bits)
    tables = fit_tables(skewed_symbols(200, bits, seed=1), 1 << bits)
    c = SymbolCoder(SHAPE, bits, tables, coder)
    for b in (1, 3):
        out = c.decode(c.encode(sym[:b]))
        assert out.dtype == np.uint8 and out.shape == (b, *SHAPE)
        np.testing.assert_array_equal(out, sym[:b])


def test_tables_are_positive_distributions_and_ans_reaches_their_cross_entropy():
    cal = skewed_symbols(500, 3, seed=1)
    tables = fit_tables(cal, 8)
    assert tables.shape == (4, 8) and (tables > 0).all()
    np.testing.assert_allclose(tables.sum(1), 1.0, rtol=1e-5)
    test = skewed_symbols(200, 3, seed=2)
    c = SymbolCoder(SHAPE, 3, tables, "ans")
    ideal = cross_entropy_bits(test, tables)
    sizes = [len(c.encode(test[i : i + 1])) - HEADER.size for i in range(len(test))]
    # ANS pays at most its 64-bit initial state per message over the ideal code length
    assert np.mean(sizes) * 8 <= ideal + 64
    assert np.mean(sizes) * 8 < 3 * np.prod(SHAPE)  # and beats 3-bit packing on skewed data
    raw = SymbolCoder(SHAPE, 3, coder="raw")
    assert len(raw.encode(test[:1])) == HEADER.size + (3 * 196 + 7) // 8


def test_symbols_outside_the_alphabet_are_refused_on_encode():
    c = SymbolCoder(SHAPE, 2, coder="raw")
    with pytest.raises(InvalidInput, match="outside"):
        c.encode(np.full((1, *SHAPE), 4, dtype=np.uint8))
    with pytest.raises(InvalidInput, match="do not match"):
        c.encode(np.zeros((1, 3, 7, 7), dtype=np.uint8))


@pytest.mark.parametrize("coder", ["ans", "zstd", "raw"])
def test_every_truncation_and_every_single_bit_flip_is_refused(coder):
    tables = fit_tables(skewed_symbols(100, 3, seed=1), 8)
    c = SymbolCoder(SHAPE, 3, tables, coder)
    payload = c.encode(skewed_symbols(2, 3))
    for n in range(len(payload)):
        with pytest.raises(InvalidInput):
            c.decode(payload[:n])
    for i in range(len(payload) * 8):
        flipped = bytearray(payload)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(InvalidInput):
            c.decode(bytes(flipped))


def test_header_checks_name_the_problem():
    tables = fit_tables(skewed_symbols(100, 3, seed=1), 8)
    ans = SymbolCoder(SHAPE, 3, tables, "ans")
    payload = ans.encode(skewed_symbols(1, 3))
    with pytest.raises(InvalidInput, match="magic"):
        ans.decode(b"X" + payload[1:])
    with pytest.raises(InvalidInput, match="version"):
        ans.decode(payload[:1] + bytes([9]) + payload[2:])
    with pytest.raises(InvalidInput, match="expects 'raw'"):
        SymbolCoder(SHAPE, 3, coder="raw").decode(payload)
    with pytest.raises(InvalidInput, match="batch"):
        SymbolCoder(SHAPE, 3, tables, "ans", max_batch=2).decode(ans.encode(skewed_symbols(3, 3)))


def _with_valid_crc(head5: bytes, body: bytes) -> bytes:
    return head5 + zlib.crc32(body, zlib.crc32(head5)).to_bytes(4, "little") + body


@pytest.mark.parametrize("coder", ["ans", "zstd", "raw"])
def test_garbage_bodies_with_a_valid_crc_are_refused_or_decode_to_the_right_shape(coder):
    """A forged payload (correct header and CRC, random body) must never crash the decoder."""
    tables = fit_tables(skewed_symbols(100, 3, seed=1), 8)
    c = SymbolCoder(SHAPE, 3, tables, coder)
    head5 = c.encode(skewed_symbols(1, 3))[:5]
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "decoded": 0}
    for n in [0, 1, 3, 4, 8, 16, 64, 74, 200, 4096]:
        for _ in range(5):
            body = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
            try:
                out = c.decode(_with_valid_crc(head5, body))
            except InvalidInput:
                outcomes["refused"] += 1
            else:
                assert out.shape == (1, *SHAPE) and int(out.max()) < 8
                outcomes["decoded"] += 1
    assert outcomes["refused"] > 0


def test_invalid_configurations_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        SymbolCoder(SHAPE, 9, coder="raw")
    with pytest.raises(ValueError, match="tables"):
        SymbolCoder(SHAPE, 3, coder="ans")
    with pytest.raises(ValueError, match="tables shape"):
        SymbolCoder(SHAPE, 3, np.full((3, 8), 0.125, dtype=np.float32), "ans")
    with pytest.raises(ValueError, match="unknown"):
        SymbolCoder(SHAPE, 3, coder="lzma")
