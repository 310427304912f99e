"""`splitinfer cloud export-triton`: the Triton model repository it writes, checked the way Triton would load it
(config.pbtxt parsed into tritonclient's ModelConfig, the model run with ONNX Runtime or torch.jit) against the
tail that `splitinfer cloud serve` runs on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from typer.testing import CliRunner

from cloud_server.cli import app
from cloud_server.export_triton import triton_model_config_module
from cloud_server.tail import TailRuntime
from splitinfer.bundle import CodecSpec, load_bundle, new_plan, save_bundle
from splitinfer.codec import get_codec
from tests.support.bundles import LEARNED_SPLIT, TEST_SPLIT, make_test_bundle

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient", reason="tritonclient[grpc] (the [dev] extra)")
model_config_pb2 = triton_model_config_module()


def export(*args: str):
    return CliRunner().invoke(app, ["export-triton", *map(str, args)])


def read_config(model_dir: Path):
    """config.pbtxt as Triton's ModelConfig (text_format raises on anything Triton would not parse)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def head_features(bundle, split: int, batch: int, seed: int) -> torch.Tensor:
    x = torch.randn(batch, *bundle.plan.input.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return bundle.staged.run(x, 0, split).clone()


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == np.float32
    assert float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def runtime(bundle_dir) -> TailRuntime:
    return TailRuntime(load_bundle(bundle_dir))


def test_default_export_is_a_triton_model_computing_the_tail(bundle_dir, runtime, tmp_path):
    res = export(bundle_dir, tmp_path)
    assert res.exit_code == 0, res.output
    model_dir = tmp_path / f"default_tail{TEST_SPLIT}"
    assert str(model_dir) in res.output and "max abs diff" in res.output and "parses as a Triton" in res.output
    cfg = read_config(model_dir)
    assert cfg.name == model_dir.name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert cfg.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    (inp,), (out,) = cfg.input, cfg.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("features", model_config_pb2.TYPE_FP32,
                                                         runtime.boundary_shape(TEST_SPLIT))
    assert (out.name, out.data_type, list(out.dims)) == ("logits", model_config_pb2.TYPE_FP32, [10])
    labels = (model_dir / out.label_filename).read_text().splitlines()
    assert labels == runtime.plan.input.labels
    assert "NOT in this model" in (model_dir / "config.pbtxt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [model_dir.name]  # no staging directory left behind

    sess = session(model_dir / "1" / "model.onnx")
    for batch in (3, 1, 7):  # the batch axis is dynamic
        feats = head_features(runtime.bundle, TEST_SPLIT, batch, seed=batch)
        got = sess.run(None, {"features": feats.numpy()})[0]
        assert_close(got, runtime.run_tail(feats.clone(), TEST_SPLIT))
    # the contract: the caller decodes the codec payload, then the model gives what the server answers
    payload, meta = get_codec("uint8-affine").encode(feats)
    decoded = get_codec("uint8-affine").decode(payload, meta)
    got = sess.run(None, {"features": decoded.numpy()})[0]
    assert_close(got, runtime.run_features(payload, "uint8-affine", meta, TEST_SPLIT))


def test_split_zero_exports_the_whole_model_under_the_plan_name(bundle_dir, runtime, tmp_path):
    res = export(bundle_dir, tmp_path, "--split", "0", "--max-batch", "8")
    assert res.exit_code == 0, res.output
    cfg = read_config(tmp_path / "default")
    assert cfg.max_batch_size == 8 and [(i.name, list(i.dims)) for i in cfg.input] == [("input", [1, 28, 28])]
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5)).numpy()
    got = session(tmp_path / "default" / "1" / "model.onnx").run(None, {"input": x})[0]
    assert_close(got, runtime.run_input(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_names_its_forward_argument_like_the_config_input(bundle_dir, runtime, tmp_path):
    res = export(bundle_dir, tmp_path, "--format", "torchscript", "--split", "4", "--model-name", "ts")
    assert res.exit_code == 0, res.output
    cfg = read_config(tmp_path / "ts")
    assert cfg.platform == "pytorch_libtorch" and cfg.input[0].name == "features"
    assert list(cfg.input[0].dims) == runtime.boundary_shape(4)
    module = torch.jit.load(str(tmp_path / "ts" / "1" / "model.pt"))
    assert [a.name for a in module.forward.schema.arguments[1:]] == ["features"]  # Triton maps inputs by this name
    feats = head_features(runtime.bundle, 4, 3, seed=2)
    with torch.no_grad():
        got = module(feats).numpy()
    assert_close(got, runtime.run_tail(feats.clone(), 4))


def test_learned_codec_split_exports_decoder_and_tail_on_symbols(learned_bundle_dir, tmp_path):
    bundle = load_bundle(learned_bundle_dir)
    rt = TailRuntime(bundle)
    lc = bundle.learned_codec_at(LEARNED_SPLIT)
    res = export(learned_bundle_dir, tmp_path)
    assert res.exit_code == 0, res.output
    model_dir = tmp_path / f"default_tail{LEARNED_SPLIT}_bottleneck"
    cfg = read_config(model_dir)
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("symbols", model_config_pb2.TYPE_UINT8,
                                                         list(lc.cfg.latent_shape))
    # the edge's payload -> entropy decoding on the caller's side -> the model == the server's answer
    payload, meta = lc.encode(head_features(bundle, LEARNED_SPLIT, 3, seed=4))
    symbols = lc.coder.decode(payload)
    got = session(model_dir / "1" / "model.onnx").run(None, {"symbols": symbols})[0]
    assert_close(got, rt.run_features(payload, "bottleneck", meta, LEARNED_SPLIT))

    res = export(learned_bundle_dir, tmp_path, "--no-decoder", "--format", "torchscript")
    assert res.exit_code == 0, res.output
    cfg = read_config(tmp_path / f"default_tail{LEARNED_SPLIT}")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("features", rt.boundary_shape(LEARNED_SPLIT))]


def test_torchvision_model_from_a_middle_split(tmp_path):
    pytest.importorskip("torchvision")
    from partitioner.target import load_target

    target = load_target("resnet18", input_shape=[3, 64, 64])
    split = target.staged.num_stages // 2
    plan = new_plan(target.name, target.staged, target.input_spec, split=split, codec=CodecSpec(name="uint8-affine"))
    bundle_dir = save_bundle(tmp_path / "bundle", plan, target.model, {})
    res = export(bundle_dir, tmp_path / "repo")
    assert res.exit_code == 0, res.output
    model_dir = tmp_path / "repo" / f"resnet18_tail{split}"
    cfg = read_config(model_dir)
    rt = TailRuntime(load_bundle(bundle_dir))
    assert list(cfg.input[0].dims) == rt.boundary_shape(split) and list(cfg.output[0].dims) == [1000]
    feats = head_features(rt.bundle, split, 3, seed=6)
    got = session(model_dir / "1" / "model.onnx").run(None, {"features": feats.numpy()})[0]
    assert_close(got, rt.run_tail(feats.clone(), split))


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "17"], "split 17 out of range"),
    (["--split", "-1"], "split -1 out of range"),
    (["--format", "tflite"], "unknown format"),
    (["--max-batch", "0"], "--max-batch"),
    (["--model-name", "../x"], "model name"),
    (["--decoder"], "learned codec"),
])
def test_bad_options_are_refused_and_nothing_is_written(bundle_dir, tmp_path, args, message):
    res = export(bundle_dir, tmp_path / "repo", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_bad_bundles_are_refused(tmp_path):
    res = export(tmp_path / "missing", tmp_path / "repo")
    assert res.exit_code == 2 and "not a directory" in res.output
    broken = make_test_bundle(tmp_path / "broken")
    (broken / "plan.json").write_text("{not json")
    res = export(broken, tmp_path / "repo")
    assert res.exit_code == 2 and "not valid JSON" in res.output
    edge_only = make_test_bundle(tmp_path / "edge_only", split=17)
    res = export(edge_only, tmp_path / "repo")
    assert res.exit_code == 2 and "pass --split" in res.output


def test_existing_model_needs_force(bundle_dir, tmp_path):
    assert export(bundle_dir, tmp_path).exit_code == 0
    res = export(bundle_dir, tmp_path)
    assert res.exit_code == 2 and "--force" in res.output
    assert export(bundle_dir, tmp_path, "--force").exit_code == 0


def test_a_model_that_disagrees_with_the_tail_fails_the_export(bundle_dir, tmp_path, monkeypatch):
    real = TailRuntime.run_tail
    monkeypatch.setattr(TailRuntime, "run_tail", lambda self, x, split: real(self, x, split) + 0.01)
    res = export(bundle_dir, tmp_path)
    assert res.exit_code == 1 and "disagrees with the torch tail" in res.output, res.output
    assert not any(tmp_path.iterdir())
