"""Learned bottleneck codec: configuration, inference folding, distillation, bundle integration, fuzzed decode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitinfer.bottleneck import (
    Bottleneck,
    BottleneckConfig,
    DistillConfig,
    LearnedCodec,
    match_boundary,
    requantize,
    train_bottleneck,
)
from splitinfer.bundle import load_bundle
from splitinfer.errors import BundleError, InvalidInput
from splitinfer.models import build_default
from splitinfer.staged import stage_model
from tests.support.bundles import LEARNED_SPLIT, make_learned_bundle


@pytest.fixture(scope="module")
def staged():
    torch.manual_seed(0)
    return stage_model(build_default().eval(), torch.zeros(1, 1, 28, 28))


def test_config_round_trips_through_plan_params_and_checks_values():
    cfg = BottleneckConfig(boundary=8, in_shape=(48, 14, 14), channels=6, bits=2, stride=2, hidden=32, coder="zstd")
    assert BottleneckConfig.from_params(json.loads(json.dumps(cfg.to_params()))) == cfg
    assert cfg.latent_shape == [6, 7, 7]
    assert BottleneckConfig(boundary=9, in_shape=(96, 7, 7), stride=2).latent_shape == [8, 4, 4]
    for bad in ({"bits": 0}, {"bits": 9}, {"stride": 3}, {"channels": 0}):
        with pytest.raises(ValueError):
            BottleneckConfig(boundary=8, in_shape=(48, 14, 14), **bad)
    with pytest.raises(ValueError, match="incomplete"):
        BottleneckConfig.from_params({"boundary": 8})


@pytest.mark.parametrize("shape,stride", [((48, 14, 14), 2), ((96, 7, 7), 2), ((32, 28, 28), 4), ((48, 14, 14), 1)])
def test_folded_inference_codec_matches_the_training_graph(shape, stride):
    torch.manual_seed(1)
    cfg = BottleneckConfig(boundary=1, in_shape=shape, channels=4, bits=3, stride=stride, hidden=16)
    bn = Bottleneck(cfg).eval()
    with torch.no_grad():
        bn.quantizer.lo.uniform_(-2, -1)
        bn.quantizer.hi.uniform_(1, 2)
        for m in bn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    codec = LearnedCodec(bn, backend="torch")
    x = torch.randn(3, *shape)
    with torch.no_grad():
        sym_ref = bn.quantizer.to_symbols(bn.encoder(x))
        ref = bn.decoder(bn.quantizer.from_symbols(sym_ref))
    np.testing.assert_array_equal(codec.symbols(x), sym_ref.to(torch.uint8).numpy())
    payload, meta = codec.encode(x)
    out = codec.decode(payload, meta)
    assert out.shape == (3, *shape)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_onnxruntime_backend_matches_eager_torch():
    torch.manual_seed(2)
    bn = Bottleneck(BottleneckConfig(boundary=6, in_shape=(48, 14, 14), channels=8, bits=3, hidden=16)).eval()
    ort_codec, torch_codec = LearnedCodec(bn, backend="onnxruntime"), LearnedCodec(bn, backend="torch")
    assert (ort_codec.backend, torch_codec.backend) == ("onnxruntime", "torch")
    assert LearnedCodec(bn).backend == "onnxruntime"  # auto picks it when it is installed
    x = torch.rand(4, 48, 14, 14)
    s_ort, s_torch = ort_codec.symbols(x), torch_codec.symbols(x)
    assert (s_ort != s_torch).mean() < 0.01  # only values within float rounding of a step midpoint may differ
    payload, meta = torch_codec.encode(x)
    torch.testing.assert_close(ort_codec.decode(payload, meta), torch_codec.decode(payload, meta),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        LearnedCodec(bn, backend="tvm")


def test_encode_refuses_wrong_shapes_and_non_finite_features():
    codec = LearnedCodec(Bottleneck(BottleneckConfig(boundary=8, in_shape=(48, 14, 14), hidden=8)).eval())
    with pytest.raises(InvalidInput, match="takes"):
        codec.encode(torch.zeros(1, 48, 7, 7))
    bad = torch.zeros(1, 48, 14, 14)
    bad[0, 3, 2, 2] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        codec.encode(bad)
    with pytest.raises(InvalidInput, match="meta version"):
        codec.decode(codec.encode(torch.zeros(1, 48, 14, 14))[0], {"v": 2})


def test_distillation_lowers_the_loss_and_calibrates_ranges_and_tables(staged):
    cfg = BottleneckConfig(boundary=8, in_shape=(48, 14, 14), channels=4, bits=2, hidden=16)
    x = torch.randn(256, 1, 28, 28)
    bn, report = train_bottleneck(staged, cfg, x, DistillConfig(epochs_float=2, epochs_qat=2, batch_size=64),
                                  progress=False)
    losses = [h["loss"] for h in report["history"]]
    assert [h["phase"] for h in report["history"]] == ["float", "float", "qat", "qat"]
    assert losses[1] < losses[0] and losses[3] < losses[2]
    assert report["match_boundary"] == match_boundary(staged, 8) == 14  # pooled [96, 1, 1]
    assert bool((bn.quantizer.hi > bn.quantizer.lo).all())
    torch.testing.assert_close(bn.tables.sum(1), torch.ones(4))
    assert all(not p.requires_grad for p in staged.parameters())  # the teacher stayed frozen
    # requantizing at another bit width keeps the encoder and refits ranges and tables
    feats = staged.run(x[:64], 0, 8)
    b4 = requantize(bn, 4, feats)
    assert b4.tables.shape == (4, 16)
    torch.testing.assert_close(b4.encoder.body[0].weight, bn.encoder.body[0].weight)


def test_bundle_carries_the_learned_codec(learned_bundle_dir):
    b = load_bundle(learned_bundle_dir)
    assert b.plan.codec.name == "bottleneck" and b.plan.split == LEARNED_SPLIT
    codec = b.codec_for("bottleneck", LEARNED_SPLIT)
    x = b.staged.run(torch.randn(2, 1, 28, 28), 0, LEARNED_SPLIT)
    payload, meta = codec.encode(x)
    assert codec.decode(payload, meta).shape == x.shape
    assert len(payload) < x[0].numel()  # far below even one byte per value
    with pytest.raises(InvalidInput, match="boundary 8 only"):
        b.codec_for("bottleneck", 9)
    assert b.codec_for("uint8-affine", 3).name == "uint8-affine"
    with pytest.raises(InvalidInput, match="unknown codec"):
        b.codec_for("gzip", 3)


def test_broken_learned_codec_bundles_are_refused(tmp_path, learned_bundle_dir):
    def copy(name):
        d = tmp_path / name
        shutil.copytree(learned_bundle_dir, d)
        return d

    d = copy("missing")
    (d / "codec_8.safetensors").unlink()
    with pytest.raises(BundleError, match="missing codec_8.safetensors"):
        load_bundle(d)
    d = copy("wrong_split")
    plan = json.loads((d / "plan.json").read_text())
    plan["split"] = 9
    (d / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match="boundary 8 only"):
        load_bundle(d)
    d = copy("not_carried")
    plan = json.loads((d / "plan.json").read_text())
    plan["learned_codecs"] = []
    (d / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match="does not carry"):
        load_bundle(d)
    d = copy("bad_params")
    plan = json.loads((d / "plan.json").read_text())
    plan["learned_codecs"][0]["params"]["channels"] = 5
    (d / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(d)


@pytest.fixture(scope="module")
def fuzz_codec(tmp_path_factory):
    bundle = load_bundle(make_learned_bundle(tmp_path_factory.mktemp("fuzz") / "b"))
    codec = bundle.codec_for("bottleneck")
    x = bundle.staged.run(torch.randn(3, 1, 28, 28), 0, LEARNED_SPLIT)
    valid = [codec.encode(x[:b])[0] for b in (1, 2, 3)]
    return codec, valid


def _decode_or_refuse(codec, payload: bytes) -> None:
    try:
        out = codec.decode(payload, {"v": 1})
    except InvalidInput:
        return
    assert out.ndim == 4 and 1 <= out.shape[0] <= codec.coder.max_batch
    assert list(out.shape[1:]) == list(codec.cfg.in_shape)
    assert bool(torch.isfinite(out).all())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_fuzz_random_payloads(fuzz_codec, data):
    codec, valid = fuzz_codec
    _decode_or_refuse(codec, data)
    _decode_or_refuse(codec, valid[0][:9] + data)  # a valid header followed by garbage


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), cut=st.integers(0, 10_000))
def test_fuzz_truncated_payloads(fuzz_codec, which, cut):
    codec, valid = fuzz_codec
    payload = valid[which]
    cut = cut % len(payload)  # a strict prefix: always truncated
    with pytest.raises(InvalidInput):
        codec.decode(payload[:cut], {"v": 1})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), flips=st.lists(st.integers(0, 1 << 20), min_size=1, max_size=8, unique=True))
def test_fuzz_bit_flipped_payloads(fuzz_codec, which, flips):
    codec, valid = fuzz_codec
    payload = bytearray(valid[which])
    positions = {f % (len(payload) * 8) for f in flips}
    for p in positions:
        payload[p // 8] ^= 1 << (p % 8)
    if bytes(payload) == valid[which]:
        return
    with pytest.raises(InvalidInput):  # CRC32 catches every burst up to 32 bits and almost all else
        codec.decode(bytes(payload), {"v": 1})
