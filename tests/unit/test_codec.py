import numpy as np
import pytest
import torch

from splitinfer.codec import Float32Codec, UInt8AffineCodec, get_codec, shape_from_str
from splitinfer.errors import InvalidInput


def test_uint8_roundtrip_error_within_half_step_per_channel():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 7, 7) * torch.linspace(0.1, 10, 16).view(1, 16, 1, 1)
    codec = UInt8AffineCodec()
    payload, meta = codec.encode(x)
    assert len(payload) == 8 * 16 + x.numel()
    y = codec.decode(payload, meta)
    assert y.shape == x.shape and y.dtype == torch.float32
    step = (x.transpose(0, 1).reshape(16, -1).amax(1) - x.transpose(0, 1).reshape(16, -1).amin(1)) / 255
    err = (x - y).abs().transpose(0, 1).reshape(16, -1).amax(1)
    assert torch.all(err <= step / 2 + 1e-5)


def test_uint8_constant_channel_is_exact():
    x = torch.zeros(1, 2, 3, 3)
    x[:, 1] = 5.0
    codec = UInt8AffineCodec()
    assert torch.equal(codec.decode(*codec.encode(x)), x)


def test_uint8_is_four_times_smaller_than_float32_on_large_tensors():
    x = torch.randn(1, 48, 14, 14)
    assert len(UInt8AffineCodec().encode(x)[0]) < len(Float32Codec().encode(x)[0]) / 3.5


@pytest.mark.parametrize("cut", [0, 1, 100, -1])
def test_truncated_or_oversized_payload_refused(cut):
    codec = UInt8AffineCodec()
    payload, meta = codec.encode(torch.randn(1, 4, 5, 5))
    bad = payload[:cut] if cut >= 0 else payload + b"\x00"
    with pytest.raises(InvalidInput, match="truncated|oversized"):
        codec.decode(bad, meta)


def test_garbled_scale_refused():
    codec = UInt8AffineCodec()
    payload, meta = codec.encode(torch.randn(1, 4, 5, 5))
    garbled = np.frombuffer(payload, dtype=np.uint8).copy()
    garbled[16:20] = np.frombuffer(np.float32(np.nan).tobytes(), dtype=np.uint8)
    with pytest.raises(InvalidInput, match="non-finite"):
        codec.decode(garbled.tobytes(), meta)


@pytest.mark.parametrize("shape", [None, "", "a,b", "1,-2,3", 5])
def test_bad_shape_meta_refused(shape):
    with pytest.raises(InvalidInput):
        shape_from_str(shape)


def test_float32_roundtrip_exact_and_unknown_codec():
    x = torch.randn(2, 3, 4)
    c = get_codec("float32")
    assert torch.equal(c.decode(*c.encode(x)), x)
    with pytest.raises(InvalidInput, match="unknown codec"):
        get_codec("nope")


def test_pooled_vectors_use_one_range_and_stay_smaller_than_float32():
    codec = UInt8AffineCodec()
    for shape in [(1, 96, 1, 1), (1, 96), (2, 10, 3)]:
        x = torch.randn(*shape)
        payload, meta = codec.encode(x)
        assert meta["granularity"] == "tensor"
        assert len(payload) == 8 + x.numel() < 4 * x.numel()
        y = codec.decode(payload, meta)
        assert (x - y).abs().max() <= (x.max() - x.min()) / 255 / 2 + 1e-5
    with pytest.raises(InvalidInput, match="granularity"):
        codec.decode(payload, {**meta, "granularity": "pixel"})
