"""A compressed model end to end: `plan compress` -> `plan make --compressed` -> bundle -> cloud server and edge
runtime, answering exactly like the model that was evaluated; damaged compressed files refused."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from edge_agent.transport import CloudClient
from partitioner.cli import app
from partitioner.codec import test_images as fashion_test_images
from splitinfer.bundle import load_bundle
from splitinfer.codec import Float32Codec
from splitinfer.compression import artifact
from splitinfer.data import fashion_mnist_dir
from splitinfer.errors import BundleError
from splitinfer.models import embedded_model
from tests.support.servers import ServerProcess, free_port, start_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def _ok(result) -> None:
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module", params=["deep", "lowrank", "prune"])
def planned(request, tmp_path_factory) -> tuple[Path, Path]:
    """(compressed model dir, bundle dir) for one method, tiny fine-tuning."""
    root = tmp_path_factory.mktemp(request.param)
    comp, bundle = root / "model", root / "bundle"
    _ok(CliRunner().invoke(app, ["compress", "--method", request.param, "--epochs", "0.25", "--train-limit", "512",
                                 "--out", str(comp), "--threads", "2"]))
    _ok(CliRunner().invoke(app, ["make", "--out", str(bundle), "--compressed", str(comp), "--splits", "interior",
                                 "--bandwidth", "1mbit", "--rtt", "20ms", "--repeats", "3", "--no-progress"]))
    return comp, bundle


@pytest.fixture(scope="module")
def server(planned, tmp_path_factory) -> Iterator[ServerProcess]:
    proc = start_server(planned[1], free_port(), free_port(), tmp_path_factory.mktemp("srv") / "server.log")
    yield proc
    proc.stop()


def _evaluated(comp: Path) -> torch.nn.Module:
    model, _ = artifact.load(comp, lambda name: embedded_model(name).build(10))
    return model


def test_bundle_ships_the_compressed_file_and_rebuilds_the_evaluated_model(planned):
    comp, bundle_dir = planned
    assert (bundle_dir / "model.safetensors").read_bytes() == (comp / "model.safetensors").read_bytes()
    bundle = load_bundle(bundle_dir)
    info = artifact.read_info(comp)
    assert bundle.plan.model.compression["method"] == info["method"]
    x, _ = fashion_test_images(limit=16)
    model = _evaluated(comp)
    with torch.inference_mode():
        assert torch.equal(bundle.staged(x), model(x))
    if info["method"] == "deep":
        assert info["figures"]["storage_ratio"] > 8 and info["coded_layers"]
    else:
        assert info["structure"] and info["figures"]["mac_reduction"] > 0.3


def test_server_and_edge_runtime_answer_like_the_evaluated_model(planned, server):
    comp, bundle_dir = planned
    bundle = load_bundle(bundle_dir)
    model = _evaluated(comp)
    split = bundle.plan.split
    assert 0 < split < bundle.num_stages
    x, _ = fashion_test_images(limit=24)
    client = CloudClient(server.address, "default", timeout_s=10.0)
    try:
        with torch.inference_mode():
            feats = bundle.staged.run(x[:4], 0, split)
            payload, meta = Float32Codec().encode(feats)
            expected = bundle.staged.run(feats, split, bundle.num_stages).numpy()
            np.testing.assert_allclose(model(x[:4]).numpy(), expected, rtol=1e-5, atol=1e-5)
        res = client.infer_features(payload, meta, split, "float32")
        np.testing.assert_allclose(res.logits, expected, rtol=1e-5, atol=1e-5)
    finally:
        client.close()
    rt = EdgeRuntime(bundle, CloudClient(server.address, "default", timeout_s=10.0),
                     EdgeSettings(bundle=bundle_dir, server=server.address), metrics=EdgeMetrics())
    try:
        results = [rt.infer(x[i : i + 1], f"r{i}") for i in range(len(x))]
    finally:
        rt.close()
    assert all(not r.degraded for r in results)
    codec = bundle.codec_for(bundle.plan.codec.name, split)
    with torch.inference_mode():
        for i, r in enumerate(results):
            if r.outcome != "cloud":
                continue
            p, m = codec.encode(bundle.staged.run(x[i : i + 1], 0, split))
            tail = bundle.staged.run(codec.decode(p, m), split, bundle.num_stages)
            assert r.label == int(tail.argmax(1))


def test_damaged_compressed_files_are_refused_clearly(planned, tmp_path):
    comp, bundle_dir = planned
    broken = tmp_path / "broken"
    shutil.copytree(comp, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x40
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        artifact.read_info(broken)
    res = CliRunner().invoke(app, ["make", "--out", str(tmp_path / "b"), "--compressed", str(broken),
                                   "--repeats", "3", "--no-progress"])
    assert res.exit_code == 2 and "sha256" in res.output and "Traceback" not in res.output
    with pytest.raises(BundleError, match="not a compressed model directory"):
        artifact.read_info(tmp_path)
    # the file itself, decoded without the directory's hash: its own digest catches it
    with pytest.raises(BundleError, match="coded weights|safetensors"):
        artifact.rebuild(embedded_model("default").build(10), artifact.recipe_of(artifact.read_info(comp)),
                         bytes(data), embedded_model("default").example())
    # a bundle whose weights were truncated after planning
    bad_bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bad_bundle)
    raw = (bad_bundle / "model.safetensors").read_bytes()
    (bad_bundle / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(BundleError, match="corrupted|safetensors"):
        load_bundle(bad_bundle)
