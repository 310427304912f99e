"""bench.privacy runs end to end on a tiny setting and reports every summary figure the issue asks for, the
reconstruction grid and a leakage table plan make can read."""

from __future__ import annotations

import json

import pytest

from bench import privacy
from splitinfer.data import fashion_mnist_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def test_bench_privacy_smoke(tmp_path):
    from partitioner.privacy import LeakageTable

    out = tmp_path / "privacy.json"
    report = privacy.main(["--out", str(out), "--quick", "--leakage-out", str(tmp_path / "leak.json")])
    s = report["summary"]
    for key in ("ssim_whitebox_uint8", "ssim_whitebox_bottleneck", "ssim_blackbox_bottleneck",
                "defence_ssim_reduction", "defence_drop", "ssim_class_only_floor"):
        assert key in s
    assert set(s["ssim_whitebox_uint8"]) == {"6", "14"}
    assert all(-1 <= v <= 1 for v in s["ssim_whitebox_uint8"].values())
    assert s["ssim_image_file"] > 0.9  # the file sent at split 0 is the image itself (PNG or JPEG q90)
    assert json.loads(out.read_text())["summary"] == s
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = LeakageTable.load(tmp_path / "leak.json")
    assert {(e.boundary, e.codec) for e in table.entries} >= {(0, "image"), (6, "uint8-affine"), (6, "bottleneck")}
    assert report["defence"]["history"] and "adversary_loss" in report["defence"]["history"][0]
