"""Smoke test of ``bench.split_pays --quick``: the second embedded model's committed learned codecs on 500 test
images, then 2 cells through the real server, link emulator and edge runtime (no cgroup), and the planner's
sensitivity tables. Checks the JSON's structure and that every request was answered; no timing assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitinfer.data import fashion_mnist_dir

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("splitinfer", "edge_only", "cloud_only", "best_fixed")
SUMMARY = ("model", "boundaries_with_codec", "codec_min_ratio_vs_fp32", "codec_max_drop",
           "codec_bytes_below_input_file", "cells", "interior_cells", "interior_min_gain_vs_better_endpoint",
           "max_ratio_vs_best_baseline", "bars")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def test_bench_split_pays_quick(tmp_path):
    out = tmp_path / "split_pays.json"
    cmd = [sys.executable, "-m", "bench.split_pays", "--quick", "--out", str(out), "--workdir",
           str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    s = d["summary"]
    assert set(SUMMARY) <= set(s)
    assert s["model"] == "mobilenet_v2_fmnist"
    assert s["cells"] == len(d["cells"]) == 2
    assert s["all_requests_answered"] is True
    assert len(s["boundaries_with_codec"]) >= 3
    codecs = d["codecs"]
    assert codecs["test_images"] == 500 and codecs["input_file_bytes_mean"] > 0
    for c in codecs["codecs"]:
        assert c["bytes_mean"] > 0 and c["ratio_vs_fp32"] == pytest.approx(c["fp32_bytes"] / c["bytes_mean"], rel=1e-2)
        assert 0 <= c["accuracy"] <= 1
    for cell in d["cells"]:
        assert cell["model"] == "mobilenet_v2_fmnist"
        assert set(cell["configs"]) == set(CONFIGS)
        for name, c in cell["configs"].items():
            assert c["answered"] == c["n"] > 0, name
            assert 0 <= c["accuracy"] <= 1, name
        assert cell["configs"]["cloud_only"]["bytes_per_request"] > 0
    sens = d["sensitivity"]
    assert set(sens["by_edge_cpu_share"]) == {"1", "0.5", "0.25", "0.125"}
    assert set(sens["by_input_size"]) == {"32", "64", "96", "128"}
    for row in [*sens["by_edge_cpu_share"].values(), *sens["by_input_size"].values()]:
        assert 0 <= row["cells_interior_wins"] <= 2
    assert set(sens["by_share_and_size"]) == {"1", "0.5", "0.25", "0.125"}
    for row in sens["by_share_and_size"].values():
        assert set(row) == {"32", "64", "96", "128"}
        assert all(0 <= v["cells_interior_gain_ge_1.15"] <= 2 and v["max_gain"] > 0 for v in row.values())
    # the grid's row at the measured share is the per-size table (same planner, same scaling)
    measured = f"{sens['measured_share']:g}"
    assert measured in sens["by_share_and_size"]  # the quick run's share (1) is one of the grid's
    for side, v in sens["by_share_and_size"][measured].items():
        assert v["max_gain"] == sens["by_input_size"][side]["max_gain"]
    bounds = sens["bounds_at_measured_share"]
    # against the same planner, a free payload can only make the best interior configuration faster
    assert bounds["free_codec"]["max_gain"] >= sens["by_edge_cpu_share"][measured]["max_gain"]
    assert bounds["no_exits"]["max_gain"] > 0
