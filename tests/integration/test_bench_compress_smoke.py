"""Smoke test of ``bench.compress`` with tiny settings: every method runs, the JSON, table and PNG are written,
and the summary holds every figure the compression issue names. No accuracy or timing assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitinfer.data import fashion_mnist_dir

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = ("deep_compression_ratio", "deep_compression_drop", "lowrank_mac_reduction", "lowrank_drop",
           "lowrank_head_speedup", "ternary_storage_ratio", "ternary_drop", "binary_drop",
           "mixed_precision_storage_ratio", "mixed_precision_drop", "auto_vs_uniform_drop_gain",
           "resnet50_lowrank_head_speedup", "policy_model_auto_vs_uniform_drop_gain",
           "policy_model_uniform_mac_fraction", "policy_model_auto_mac_fraction")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def test_bench_compress_tiny(tmp_path):
    out = tmp_path / "compress.json"
    cmd = [sys.executable, "-m", "bench.compress", "--out", str(out), "--epochs", "0.02", "--train-limit", "600",
           "--test-limit", "200", "--val-images", "100", "--rounds", "1", "--resnet-keep", "0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    s = d["summary"]
    assert set(SUMMARY) <= set(s)
    assert all(s[k] is not None for k in SUMMARY), {k: s[k] for k in SUMMARY}
    names = [v["name"] for v in d["variants"]]
    assert names[0] == "fp32" and {"deep", "lowrank", "auto", "uniform", "ternary", "binary", "mixed"} <= set(names)
    for v in d["variants"]:
        assert v["test_images"] == 200 and v["stored_bytes"] > 0
    assert s["deep_compression_ratio"] > 8  # coded weights are far smaller than fp32 whatever the accuracy
    assert d["resnet50"]["head_macs"] < d["resnet50"]["head_macs_fp32"]
    # the second model's pair: the policy never gets more MACs than uniform kept (its budget is uniform's
    # exact fraction)
    pm = d["policy_model"]
    assert pm["model"] == s["policy_model"] == "mobilenet_v2_fmnist"
    assert [v["name"] for v in pm["variants"]] == ["fp32", "uniform", "auto"]
    _, uniform, auto = (v["report"] for v in pm["variants"])
    assert auto["macs_before"] == uniform["macs_before"]
    assert auto["macs_after"] <= uniform["macs_after"]
    assert s["policy_model_auto_mac_fraction"] <= s["policy_model_uniform_mac_fraction"]
    assert s["policy_model_uniform_mac_fraction"] < 1
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "variant" in proc.stdout and "resnet50 head" in proc.stdout
    assert "automated policy vs uniform on mobilenet_v2_fmnist" in proc.stdout
