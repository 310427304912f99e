"""The tail in a real Triton Inference Server (2.51, nvidia-pytriton wheel, CPU, Python backend): the repository
``splitinfer cloud export-triton --backend python`` writes loads, and the stock tritonclient, our edge's client
and the edge runtime itself get from it the answers our own server gives for the same payloads.

Slow: the first run installs nvidia-pytriton into ``runs/.venv-triton`` (~40 s); Triton starts in ~5 s."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_server.triton_python import prepare_triton, start_tritonserver
from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from edge_agent.transport import CloudClient
from splitinfer.bundle import load_bundle
from splitinfer.errors import InvalidInput
from tests.support.bundles import LEARNED_SPLIT
from tests.support.servers import ServerProcess, free_port, start_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4


@pytest.fixture(scope="module")
def triton(learned_bundle_dir, tmp_path_factory) -> Iterator[str]:
    install = prepare_triton(ROOT / "runs" / ".venv-triton")
    repo = tmp_path_factory.mktemp("triton") / "repo"
    done = subprocess.run([sys.executable, "-m", "splitinfer", "cloud", "export-triton", str(learned_bundle_dir),
                           str(repo), "--backend", "python", "--tail-engine", "onnxruntime"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in repo.iterdir()} == {"default", "default_decode", "default_tail"}
    port = free_port()
    daemon = start_tritonserver(install, repo, port, repo.parent / "tritonserver.log", model="default")
    yield f"127.0.0.1:{port}"
    daemon.stop()


@pytest.fixture(scope="module")
def ours(learned_bundle_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    proc = start_server(learned_bundle_dir, free_port(), free_port(), tmp_path_factory.mktemp("ours") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def payloads(learned_bundle_dir) -> list[tuple[bytes, dict]]:
    bundle = load_bundle(learned_bundle_dir)
    codec = bundle.codec_for("bottleneck", LEARNED_SPLIT)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        feats = bundle.staged.run(x, 0, LEARNED_SPLIT)
    return [codec.encode(feats[i:i + n]) for i, n in ((0, 1), (1, 1), (2, 3), (5, 1))]


def test_edge_client_gets_our_servers_answers_from_triton(triton, ours, payloads):
    to_triton, to_ours = CloudClient(triton, "default", timeout_s=30), CloudClient(ours.address, "default",
                                                                                    timeout_s=30)
    try:
        for payload, meta in payloads:
            got = to_triton.infer_features(payload, meta, LEARNED_SPLIT, "bottleneck").logits
            ref = to_ours.infer_features(payload, meta, LEARNED_SPLIT, "bottleneck").logits
            assert got.shape == ref.shape and got.dtype == np.float32
            assert np.abs(got - ref).max() <= TOL * max(1.0, float(np.abs(ref).max()))
        with pytest.raises(InvalidInput, match="truncated"):  # the server's own checks, one answer per request
            to_triton.infer_features(payloads[0][0][:5], payloads[0][1], LEARNED_SPLIT, "bottleneck")
        with pytest.raises(InvalidInput, match="out of range"):
            to_triton.infer_features(payloads[0][0], payloads[0][1], 999, "bottleneck")
    finally:
        to_triton.close()
        to_ours.close()


def test_stock_tritonclient_sends_the_edges_request(triton, ours, payloads):
    job = {"address": triton, "model": "default", "requests": [
        {"payload_hex": p.hex(), "parameters": {"split": LEARNED_SPLIT, "codec": "bottleneck",
                                                **{f"codec.{k}": v for k, v in meta.items()}}}
        for p, meta in payloads] + [{"payload_hex": "00", "parameters": {"codec": "bottleneck"}}]}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "triton_stock_client.py")],
                          input=json.dumps(job), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    client = CloudClient(ours.address, "default", timeout_s=30)
    try:
        for (payload, meta), answer in zip(payloads, answers, strict=False):
            ref = client.infer_features(payload, meta, LEARNED_SPLIT, "bottleneck").logits
            got = np.asarray(answer["logits"], dtype=np.float32)
            assert np.abs(got - ref).max() <= TOL * max(1.0, float(np.abs(ref).max()))
    finally:
        client.close()
    assert "split" in answers[-1]["error"] and "INVALID_ARG" in answers[-1]["status"]


def test_edge_runtime_offloads_to_triton_like_to_ours(learned_bundle_dir, triton, ours):
    results = {}
    for name, address in (("triton", triton), ("ours", ours.address)):
        bundle = load_bundle(learned_bundle_dir)
        client = CloudClient(address, "default", timeout_s=30)
        rt = EdgeRuntime(bundle, client, EdgeSettings(bundle=learned_bundle_dir, server=address),
                         metrics=EdgeMetrics())
        g = torch.Generator().manual_seed(7)
        try:
            results[name] = [rt.infer(torch.randn(1, 1, 28, 28, generator=g), f"r{i}") for i in range(6)]
        finally:
            rt.close()
    assert any(r.outcome == "cloud" for r in results["triton"])
    for t, o in zip(results["triton"], results["ours"], strict=True):
        assert (t.outcome, t.label) == (o.outcome, o.label)
        assert abs(t.confidence - o.confidence) <= 1e-4
