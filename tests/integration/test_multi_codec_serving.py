"""A bundle with two learned codecs (boundaries 3 and 6 of the committed default model): a real cloud server
decodes each offload with the codec at the request's split, and both edge engines (torch, and the ONNX head
with numpy codecs) encode with the codec at the split they run."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_agent.metrics import EdgeMetrics
from edge_agent.onnx_head import MANIFEST_FILE, NumpyEdge, OnnxHead, export_head
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from edge_agent.transport import CloudClient
from splitinfer.bundle import Bundle, load_bundle
from splitinfer.errors import InvalidInput
from tests.support.bundles import MULTI_CODEC_BOUNDARIES, make_multi_codec_bundle
from tests.support.servers import ServerProcess, free_port, start_server

A, B = MULTI_CODEC_BOUNDARIES
TOL = 1e-4


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_multi_codec_bundle(tmp_path_factory.mktemp("multi-codec") / "b")


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> Bundle:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    proc = start_server(bundle_dir, free_port(), free_port(), tmp_path_factory.mktemp("multi-codec") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> Iterator[CloudClient]:
    c = CloudClient(server.address, "default", timeout_s=10.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def exported(bundle_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi-codec-onnx") / "head"
    export_head(bundle_dir, out_dir=out)
    return out


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _expected(bundle: Bundle, payload: bytes, meta: dict, split: int) -> np.ndarray:
    """What the server must answer: the payload decoded by the codec at ``split``, then the tail."""
    with torch.inference_mode():
        x = bundle.codec_for("bottleneck", split).decode(payload, meta)
        return bundle.staged.run(x, split, bundle.num_stages).numpy()


class RecordingClient:
    """A real CloudClient that records every offload (payload, meta, split, codec) it forwards."""

    def __init__(self, inner: CloudClient) -> None:
        self.inner = inner
        self.sent: list[tuple[bytes, dict, int, str]] = []

    def infer_features(self, payload: bytes, meta: dict, split: int, codec: str, request_id: str = "") -> Any:
        self.sent.append((payload, dict(meta), split, codec))
        return self.inner.infer_features(payload, meta, split, codec, request_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_server_decodes_with_the_codec_at_the_requests_split(bundle, client):
    x = _inputs(2, seed=1)
    sizes = {}
    for split in (A, B):
        codec = bundle.codec_for("bottleneck", split)
        assert codec is bundle.learned_codecs[split] and codec.boundary == split
        with torch.inference_mode():
            payload, meta = codec.encode(bundle.staged.run(x.clone(), 0, split))
        res = client.infer_features(payload, meta, split, "bottleneck", f"multi-{split}")
        np.testing.assert_allclose(res.logits, _expected(bundle, payload, meta, split), rtol=TOL, atol=TOL)
        sizes[split] = len(payload)
    assert sizes[A] != sizes[B]  # two different latents ([4, 14, 14] vs [4, 7, 7] symbols)


def test_server_refuses_the_learned_codec_where_the_bundle_has_none(bundle, client, server):
    with torch.inference_mode():
        payload, meta = bundle.codec_for("bottleneck", A).encode(bundle.staged.run(_inputs(1, 2), 0, A))
    with pytest.raises(InvalidInput, match=f"works at boundaries {A}, {B} only, not at split 4"):
        client.infer_features(payload, meta, 4, "bottleneck")
    assert server.proc.poll() is None
    assert client.infer_features(payload, meta, A, "bottleneck").logits.shape == (1, 10)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_edge_runtime_offloads_with_the_codec_at_each_split(backend, bundle, bundle_dir, server, exported):
    """The agent (torch engine, or the ONNX head with numpy codecs) switched between the two operating points
    offloads with the codec at each split; the real server answers what decoding with that codec gives."""
    inner = CloudClient(server.address, "default", timeout_s=10.0)
    client = RecordingClient(inner)
    settings = EdgeSettings(bundle=bundle_dir, server=server.address, adaptive=False, head_backend=backend,
                            onnx_head_dir=exported if backend == "onnx" else None)
    rt = EdgeRuntime(bundle, client, settings, metrics=EdgeMetrics())
    x = _inputs(3, seed=3)
    try:
        assert rt.engine.kind == backend
        for split in (A, B):
            rt.set_operating_point(split, "bottleneck")
            assert rt.codec_name == "bottleneck"
            if backend == "torch":
                assert rt.codec is bundle.learned_codecs[split]
            for i in range(len(x)):
                res = rt.infer(x[i : i + 1].numpy(), f"{backend}-{split}-{i}")
                assert res.outcome == "cloud", res
                payload, meta, sent_split, codec = client.sent[-1]
                assert (sent_split, codec) == (split, "bottleneck")
                with torch.inference_mode():
                    ref, _ = bundle.learned_codecs[split].encode(bundle.staged.run(x[i : i + 1].clone(), 0, split))
                assert payload == ref  # the same bytes as the bundle's codec at this split
                assert res.label == int(np.argmax(_expected(bundle, payload, meta, split)[0]))
    finally:
        rt.close()
        inner.close()


def test_onnx_export_carries_every_learned_encoder_by_boundary(bundle, exported, client):
    head = OnnxHead.load(exported, bundle_dir=bundle.path)
    m = head.manifest
    assert [c.boundary for c in m.learned_codecs] == [A, B] == head.learned_boundaries
    assert [c.encoder.file for c in m.learned_codecs] == [f"encoder_{A:02d}.onnx", f"encoder_{B:02d}.onnx"]
    assert {c.encoder.file for c in m.learned_codecs} <= {e.file for e in m.entries()}
    assert m.learned_codec_at(4) is None
    x = _inputs(2, seed=4).numpy()
    for split in (A, B):
        lc = bundle.learned_codecs[split]
        assert m.learned_codec_at(split).latent_shape == list(lc.cfg.latent_shape)
        h = head.run(x, 0, split)
        with torch.inference_mode():
            assert np.abs(head.latent(h, split) - lc._latent(torch.from_numpy(h.copy()))).max() <= TOL
            payload, meta = head.codec("bottleneck", split).encode(h)
            assert payload == lc.encode(torch.from_numpy(h.copy()))[0]
        res = client.infer_features(payload, meta, split, "bottleneck")
        np.testing.assert_allclose(res.logits, _expected(bundle, payload, meta, split), rtol=TOL, atol=TOL)
        edge = NumpyEdge(head, split)
        assert edge.codec == "bottleneck"
        decision = edge.infer(x[:1])
        assert decision.decided_by == "cloud" and decision.payload == head.codec("bottleneck", split).encode(
            head.run(x[:1], 0, split))[0]
    with pytest.raises(InvalidInput, match=f"boundaries {A}, {B}, not 4"):
        head.codec("bottleneck", 4)
    with pytest.raises(InvalidInput, match="name the boundary"):
        head.latent(head.run(x, 0, A))
    with pytest.raises(InvalidInput, match="no learned codec encoder at boundary 4"):
        head.latent(np.zeros((1, *bundle.plan.boundaries[4].shape), np.float32), 4)


def test_an_old_export_with_its_one_encoder_in_codec_still_loads(exported, tmp_path):
    """Exports made before several learned codecs held the one learned codec (and its encoder) in ``codec``."""
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    raw = json.loads((old / MANIFEST_FILE).read_text())
    learned = raw.pop("learned_codecs")
    raw["codec"] = {**learned[-1], "name": raw["codec"]["name"]}  # the codec at B, as an old export wrote it
    (old / learned[0]["encoder"]["file"]).unlink()
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    head = OnnxHead.load(old)
    assert head.learned_boundaries == [B] and head.manifest.codec.encoder is None
    h = head.run(_inputs(1, seed=6).numpy(), 0, B)
    assert head.codec("bottleneck", B).encode(h)[0] == head.codec("bottleneck").encode(h)[0]
