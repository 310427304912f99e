"""Coded weights: bit-exact round trips, and every corruption refused with a clear error (fuzzed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitinfer.compression.coding import CodedTensor, decode_state, encode_state, is_coded, symmetric_codebook
from splitinfer.errors import BundleError


def _state() -> tuple[dict[str, torch.Tensor], dict[str, CodedTensor]]:
    g = torch.Generator().manual_seed(0)
    sym_a = torch.randint(0, 16, (8, 4, 3, 3), generator=g)
    sym_a[sym_a > 9] = 0  # sparse: symbol 0 is a pruned weight
    book_a = torch.cat([torch.zeros(1), torch.randn(15, generator=g)]).unsqueeze(0)
    sym_b = torch.randint(0, 7, (10, 6), generator=g)
    scales = torch.rand(10, generator=g) + 0.1
    a = CodedTensor(sym_a, book_a, 4)
    b = CodedTensor(sym_b, symmetric_codebook(scales, 3), 3, scales=scales)
    state = {"conv.weight": a.values(), "fc.weight": b.values(), "fc.bias": torch.randn(10, generator=g),
             "bn.num_batches_tracked": torch.tensor(7)}
    return state, {"conv.weight": a, "fc.weight": b}


@pytest.mark.parametrize("coder", ["ans", "raw"])
def test_round_trip_is_bit_exact(coder):
    state, coded = _state()
    data = encode_state(state, coded, coder=coder)
    assert is_coded(data)
    out = decode_state(data)
    assert sorted(out) == sorted(state)
    for k, v in state.items():
        assert torch.equal(out[k], v), k
    assert out["conv.weight"].eq(0).float().mean() > 0.3  # pruned positions come back as exact zeros


def test_ans_codes_sparse_symbols_below_their_bit_width():
    g = torch.Generator().manual_seed(1)
    sym = torch.randint(1, 16, (64, 64, 3, 3), generator=g) * (torch.rand(64, 64, 3, 3, generator=g) > 0.7)
    c = CodedTensor(sym, torch.cat([torch.zeros(1), torch.randn(15, generator=g)]).unsqueeze(0), 4)
    ans, raw = (encode_state({"w": c.values()}, {"w": c}, coder) for coder in ("ans", "raw"))
    assert len(ans) < 0.6 * len(raw)  # 70 % zeros: ~2 bits per weight instead of 4


def test_encoder_refuses_codes_that_do_not_reproduce_the_weight():
    state, coded = _state()
    state["conv.weight"] = state["conv.weight"] + 1e-3
    with pytest.raises(ValueError, match="exactly"):
        encode_state(state, coded)


def test_plain_safetensors_is_not_coded():
    from safetensors.torch import save

    assert not is_coded(save({"w": torch.zeros(3)}))
    assert not is_coded(b"garbage")


_DATA = encode_state(*_state())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(["flip", "truncate", "insert", "zero_run"]), pos=st.floats(0, 1),
       value=st.integers(1, 255), length=st.integers(1, 64))
def test_fuzzed_files_are_refused_or_decode_to_the_original(op, pos, value, length):
    data = bytearray(_DATA)
    i = min(len(data) - 1, int(pos * len(data)))
    if op == "flip":
        data[i] ^= value
    elif op == "truncate":
        data = data[:i]
    elif op == "insert":
        data[i:i] = bytes([value]) * length
    else:
        data[i : i + length] = bytes(len(data[i : i + length]))
    try:
        out = decode_state(bytes(data))
    except BundleError as exc:
        assert str(exc).startswith("coded weights"), str(exc)
        return
    # a change that decodes must not alter the model (e.g. whitespace in the JSON header is tolerated)
    ref = decode_state(_DATA)
    assert sorted(out) == sorted(ref) and all(torch.equal(out[k], ref[k]) for k in ref)


def test_a_wrong_digest_names_corruption():
    data = bytearray(_DATA)
    data[-1] ^= 1  # last byte of the tensor data
    with pytest.raises(BundleError, match="sha256"):
        decode_state(bytes(data))
