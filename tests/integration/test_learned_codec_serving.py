"""The learned bottleneck codec end to end: edge runtime -> real cloud server process -> tail."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from edge_agent.transport import CloudClient
from splitinfer.bundle import load_bundle
from splitinfer.errors import InvalidInput
from tests.support.bundles import LEARNED_SPLIT
from tests.support.servers import ServerProcess, free_port, start_server


@pytest.fixture(scope="module")
def server(learned_bundle_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    proc = start_server(learned_bundle_dir, free_port(), free_port(), tmp_path_factory.mktemp("learned") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> Iterator[CloudClient]:
    c = CloudClient(server.address, "default", timeout_s=10.0)
    yield c
    c.close()


def test_server_decodes_learned_payloads_like_the_local_decoder(learned_bundle_dir, client):
    bundle = load_bundle(learned_bundle_dir)
    codec = bundle.codec_for("bottleneck", LEARNED_SPLIT)
    torch.manual_seed(3)
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        feats = bundle.staged.run(x, 0, LEARNED_SPLIT)
        payload, meta = codec.encode(feats)
        expected = bundle.staged.run(codec.decode(payload, meta), LEARNED_SPLIT, bundle.num_stages).numpy()
    res = client.infer_features(payload, meta, LEARNED_SPLIT, "bottleneck", "learned-1")
    np.testing.assert_allclose(res.logits, expected, rtol=1e-4, atol=1e-4)
    assert len(payload) < feats[0].numel() // 4  # well under one bit per boundary value


def test_server_refuses_damaged_or_misplaced_learned_payloads(learned_bundle_dir, client, server):
    bundle = load_bundle(learned_bundle_dir)
    codec = bundle.codec_for("bottleneck", LEARNED_SPLIT)
    with torch.inference_mode():
        payload, meta = codec.encode(bundle.staged.run(torch.randn(1, 1, 28, 28), 0, LEARNED_SPLIT))
    with pytest.raises(InvalidInput, match="truncated|CRC"):
        client.infer_features(payload[:-3], meta, LEARNED_SPLIT, "bottleneck")
    flipped = bytearray(payload)
    flipped[-1] ^= 0x10
    with pytest.raises(InvalidInput, match="CRC"):
        client.infer_features(bytes(flipped), meta, LEARNED_SPLIT, "bottleneck")
    with pytest.raises(InvalidInput, match="boundary 8 only"):
        client.infer_features(payload, meta, LEARNED_SPLIT + 1, "bottleneck")
    assert server.proc.poll() is None  # still serving
    res = client.infer_features(payload, meta, LEARNED_SPLIT, "bottleneck")
    assert res.logits.shape == (1, 10)


def test_edge_runtime_offloads_with_the_learned_codec(learned_bundle_dir, server):
    bundle = load_bundle(learned_bundle_dir)
    client = CloudClient(server.address, "default", timeout_s=10.0)
    rt = EdgeRuntime(bundle, client, EdgeSettings(bundle=learned_bundle_dir, server=server.address),
                     metrics=EdgeMetrics())
    try:
        assert rt.codec.name == "bottleneck"
        results = [rt.infer(torch.randn(1, 1, 28, 28), f"r{i}") for i in range(5)]
    finally:
        rt.close()
    cloud = [r for r in results if r.outcome == "cloud"]
    assert cloud, [r.outcome for r in results]
    uint8_bytes = bundle.staged.boundaries[LEARNED_SPLIT].numel + 8 * 48
    assert all(r.bytes_sent < uint8_bytes // 4 for r in cloud)


def test_server_refuses_batches_above_its_limit_from_the_payload_header(learned_bundle_dir, client):
    bundle = load_bundle(learned_bundle_dir)
    codec = bundle.codec_for("bottleneck", LEARNED_SPLIT)
    with torch.inference_mode():
        payload, meta = codec.encode(bundle.staged.run(torch.randn(5, 1, 28, 28), 0, LEARNED_SPLIT))
    with pytest.raises(InvalidInput, match="batch 5 outside 1..4"):  # the test server runs with max_request_batch 4
        client.infer_features(payload, meta, LEARNED_SPLIT, "bottleneck")


def test_grpc_through_the_link_emulator(learned_bundle_dir, server):
    from bench.linkemu import LinkSettings, start_in_thread

    bundle = load_bundle(learned_bundle_dir)
    codec = bundle.codec_for("bottleneck", LEARNED_SPLIT)
    with torch.inference_mode():
        payload, meta = codec.encode(bundle.staged.run(torch.randn(1, 1, 28, 28), 0, LEARNED_SPLIT))
    with start_in_thread("127.0.0.1", server.port, LinkSettings(rate_bps=2e6, delay_s=0.02)) as emu:
        c = CloudClient(f"127.0.0.1:{emu.port}", "default", timeout_s=10.0)
        try:
            results = [c.infer_features(payload, meta, LEARNED_SPLIT, "bottleneck") for _ in range(3)]
        finally:
            c.close()
        assert emu.stats.bytes_up > 3 * len(payload)
    assert all(r.logits.shape == (1, 10) for r in results)
    assert min(r.round_trip_s for r in results) >= 0.04 * 0.98  # two one-way delays at least
