"""bench.models runs end to end on a small setting and reports every summary figure the issue asks for."""

from __future__ import annotations

import json

import pytest

from splitinfer.data import fashion_mnist_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]
pytest.importorskip("torchvision")


def test_bench_models_smoke(tmp_path):
    from bench import models

    out = tmp_path / "models.json"
    report = models.main(["--out", str(out), "--quick"])
    s = report["summary"]
    for key in ("models_total", "models_staged", "params_exact", "macs_within_2pct_frac", "vit_accuracy",
                "vit_exit_mac_ratio", "vit_codec_ratio_at_1pt"):
        assert key in s
    assert s["models_total"] == s["models_staged"] == s["params_exact"] == 3
    assert s["macs_within_2pct_frac"] == 1.0
    assert 0.5 < s["vit_accuracy"] <= 1.0 and 0 < s["vit_exit_mac_ratio"] <= 1.0
    vit = report["vit"]
    assert vit["codecs"], "no committed vit_fmnist learned codec was evaluated"
    for c in vit["codecs"]:
        assert c["shape"] == [50, 96] and c["learned_ratio_vs_fp32"] > c["uint8_ratio_vs_fp32"] > 3
        assert set(c["uint8_granularity"]) == {"per_token", "per_channel", "reference_accuracy"}
    assert json.loads(out.read_text())["summary"] == s
