"""Vision transformers end to end: `plan make` for vit_b_16 and swin_t (random weights, published input size) on
a slow edge at 10 Mbit/s / 20 ms, then a real cloud server and a real edge agent serving a photograph through an
interior split of the token tensor; the staged head + tail equals the whole model exactly."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from partitioner.cli import app
from splitinfer.bundle import load_bundle
from splitinfer.daemons import Daemon
from splitinfer.imaging import decode_upload
from tests.support.servers import ROOT, free_port, start_server

pytestmark = pytest.mark.slow  # plans and serves two transformers (about 2 minutes)

pytest.importorskip("torchvision")
skimage_data = pytest.importorskip("skimage.data")


def _photo_jpeg() -> bytes:
    """A real photograph (scikit-image's bundled cat, 451x300) as a JPEG upload."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _plan(tmp: Path, model: str, *extra: str) -> tuple[Path, dict]:
    runner = CliRunner()
    for name, more in (("edge", []), ("server", ["--batch-sizes", "1,2"])):
        prof = tmp / f"{name}.json"
        if not prof.exists():
            res = runner.invoke(app, ["profile", "--model", model, "--repeats", "2", "--out", str(prof),
                                      "--no-progress", *more])
            assert res.exit_code == 0, res.output
    out = tmp / ("bundle" + "-".join(extra))
    res = runner.invoke(app, ["make", "--model", model, "--edge-profile", str(tmp / "edge.json"),
                              "--server-profile", str(tmp / "server.json"), "--edge-slowdown", "8",
                              "--bandwidth", "10mbit", "--rtt", "20ms", "--out", str(out), "--json",
                              "--no-progress", *extra])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


@pytest.mark.parametrize("model", ["vit_b_16", "swin_t"])
def test_transformer_planned_and_served_through_an_interior_split(tmp_path, model):
    default_dir, default = _plan(tmp_path, model)
    assert load_bundle(default_dir).plan.split == default["split"]  # the unconstrained plan is written too
    bundle_dir, chosen = _plan(tmp_path, model, "--splits", "interior")
    bundle = load_bundle(bundle_dir)
    n, split = bundle.staged.num_stages, bundle.plan.split
    assert 0 < split < n and chosen["split"] == split
    assert len(bundle.staged.boundaries[split].shape) in (2, 3)  # tokens [L, D] (ViT) or [H, W, C] (Swin)

    photo = _photo_jpeg()
    x = torch.from_numpy(decode_upload(photo, bundle.plan.input))
    with torch.inference_mode():
        whole = bundle.staged.model(x)
        h = bundle.staged.run(x, 0, split)
        assert torch.equal(bundle.staged.run(h, split, n), whole)  # head + tail == the whole model, bit for bit
        for b in range(1, n):  # and at every other boundary too
            assert torch.equal(bundle.staged.run(bundle.staged.run(x, 0, b), b, n), whole), b
        codec = bundle.codec_for(bundle.plan.codec.name, split)
        expected = torch.softmax(bundle.staged.run(codec.decode(*codec.encode(h)), split, n), dim=1)[0]

    server = start_server(bundle_dir, free_port(), free_port(), tmp_path / "server.log")
    http_port = free_port()
    agent = Daemon([sys.executable, "-m", "edge_agent", "run", "--bundle", str(bundle_dir), "--server",
                    server.address, "--port", str(http_port), "--timeout-s", "60"], name="edge agent",
                   log_path=tmp_path / "agent.log", cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "SPLITINFER_EDGE_ADAPTIVE": "0"}, stop_timeout=20)
    try:
        agent.wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120) as http:
            status = http.get("/v1/status").json()
            assert status["split"] == split
            r = http.post("/v1/infer", files={"file": ("cat.jpg", photo, "image/jpeg")})
            assert r.status_code == 200, r.text
            body = r.json()
    except BaseException:
        for log in (tmp_path / "server.log", tmp_path / "agent.log"):
            if log.exists():
                print(f"--- {log.name} ---\n{log.read_text()[-4000:]}")
        raise
    finally:
        agent.stop()
        server.stop()
    assert body["decided_by"] == "cloud" and not body["degraded"]
    payload_bytes = len(codec.encode(h)[0])
    assert body["bytes_sent"] >= payload_bytes  # the encoded token tensor crossed the link
    assert body["label"] == int(expected.argmax())
    assert body["confidence"] == pytest.approx(float(expected.max()), rel=1e-4)
    assert body["class_name"] == bundle.plan.input.labels[body["label"]]
    assert np.isfinite(body["latency_ms"]["total"])
