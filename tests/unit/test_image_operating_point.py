"""Cloud-only by sending the input file: the planner's ``image`` codec option and the agent's image payload."""

from __future__ import annotations

import numpy as np
import torch

from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from partitioner.cost import Link
from partitioner.make import image_codec_option
from partitioner.profile import profile_model
from partitioner.search import CodecOption, Planner
from splitinfer.bundle import load_bundle
from splitinfer.codec import get_codec
from splitinfer.imaging import ImageCodec, decode_image
from tests.support.bundles import make_test_bundle
from tests.support.fakes import FakeResult


class Capture:
    def __init__(self, bundle):
        self.bundle = bundle
        self.sent: list[tuple[bytes, dict, int, str]] = []

    def infer_features(self, payload, meta, split, codec, request_id=""):
        self.sent.append((payload, dict(meta), split, codec))
        x = self.bundle.codec_for(codec, split).decode(payload, meta)
        with torch.inference_mode():
            logits = self.bundle.staged.run(x, split, self.bundle.num_stages).numpy()
        return FakeResult(logits, len(payload), 60, 0.1, 0.5, 0.002)

    def server_ready(self):
        return True

    def check_ready(self):
        pass

    def close(self):
        pass


def _pngs(bundle, n=8):
    """Image-like inputs (a bright blob on a dark background, as in Fashion-MNIST): PNG compresses them."""
    rng = np.random.default_rng(1)
    codec = ImageCodec(bundle.plan.input)
    yy, xx = np.mgrid[0:28, 0:28]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(9, 19), rng.uniform(9, 19), rng.uniform(5, 9)
        img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 200 + rng.integers(0, 40), 0).astype(np.uint8)
        out.append(codec.encode(img)[0])
    return out


def test_planner_prefers_sending_the_file_when_it_is_smaller_than_any_tensor(tmp_path):
    bundle = load_bundle(make_test_bundle(tmp_path / "b"))
    pngs = _pngs(bundle)
    prof = profile_model(bundle.staged, {}, get_codec("uint8-affine"), torch.zeros(1, 1, 28, 28), repeats=2)
    option = image_codec_option(prof, prof, pngs, bundle.plan.input)
    assert option.name == "image" and option.boundaries == frozenset({0})
    assert option.edge.payload_bytes[0] == round(np.mean([len(p) for p in pngs]))
    assert option.edge.encode_ms[0] > 0 and option.server.decode_ms[0] > 0
    planner = Planner([CodecOption("uint8-affine", prof, prof), option], [0, bundle.num_stages])
    at_zero = {e.codec: e for e in planner.evaluate(Link(0.5e6, 0.005)) if e.split == 0}
    assert set(at_zero) == {"uint8-affine", "image"}
    assert at_zero["image"].bytes_per_offload < at_zero["uint8-affine"].bytes_per_offload
    assert at_zero["image"].expected_latency_ms < at_zero["uint8-affine"].expected_latency_ms
    assert image_codec_option(prof, prof, [], bundle.plan.input) is None


def test_agent_forwards_the_upload_or_encodes_the_input_again_losslessly(tmp_path):
    bundle = load_bundle(make_test_bundle(tmp_path / "b", thresholds=(1.01, 1.01)))
    client = Capture(bundle)
    rt = EdgeRuntime(bundle, client, EdgeSettings(bundle=bundle.path, server="127.0.0.1:1", adaptive=False),
                     metrics=EdgeMetrics())
    rt.set_operating_point(0, "image", [])
    png = _pngs(bundle, 1)[0]
    x = decode_image(png, bundle.plan.input)
    first = rt.infer(x, "a", raw=png)
    assert client.sent[-1] == (png, {"format": "png"}, 0, "image") and first.decided_by == "cloud"
    second = rt.infer(x, "b")  # no file: the agent encodes x as PNG again (lossless for uint8 pixels)
    payload, meta, split, codec = client.sent[-1]
    assert (meta, split, codec) == ({"format": "png"}, 0, "image") and payload.startswith(b"\x89PNG")
    np.testing.assert_allclose(decode_image(payload, bundle.plan.input), x, atol=1e-5, rtol=0)
    assert second.label == first.label
    rt.close()
