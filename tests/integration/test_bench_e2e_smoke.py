"""Smoke test of the end-to-end benchmark (``bench.e2e --quick``): the default model in 2 cells with a few
requests per configuration and a short drop trace, through the real server, link emulator and edge runtime (no
cgroup). Checks the JSON's structure and that every request was answered; no timing assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitinfer.data import fashion_mnist_dir

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("splitinfer", "edge_only", "cloud_only", "best_fixed")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def test_bench_e2e_quick(tmp_path):
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "-m", "bench.e2e", "--quick", "--out", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0

    s = d["summary"]
    for key in ("cells", "max_ratio_vs_best_baseline", "mean_gain_vs_worse_baseline", "mean_gain_definition",
                "drop_trace_p95_ratio", "bars", "all_requests_answered"):
        assert key in s, key
    assert s["cells"] == len(d["cells"]) == 2
    assert s["all_requests_answered"] is True
    assert {"bandwidths_mbps", "rtts_ms", "requests_per_config_and_cell", "adaptive", "splitinfer_warmup",
            "models_info"} <= set(d["settings"])
    assert d["settings"]["models_info"]["default"]["best_fixed"]["split"] >= 0

    n = d["settings"]["requests_per_config_and_cell"]["default"]
    assert s["max_ratio_upper95"] >= s["max_ratio_vs_best_baseline"] * 0.5
    assert s["max_adaptation_cost"] > 0 and s["cells_with_adaptation_cost"] == 2
    assert "adaptation_cost_le_1.02_in_every_cell" in s["bars"]
    for cell in d["cells"]:
        assert cell["model"] == "default"
        assert set(CONFIGS) <= set(cell["configs"])
        for name, c in cell["configs"].items():
            if "screened_out" in c:  # dropped after the screening rounds as far off the best
                assert 0 < c["n"] < n and name in cell["configs_screened_out"], name
            else:
                assert c["n"] == n, name
            assert c["answered"] == c["n"], name  # every request got an answer
            for key in ("mean_ms", "p95_ms", "bytes_per_request", "energy_j_per_request", "accuracy"):
                assert c[key] >= 0, (name, key)
        assert cell["configs"]["cloud_only"]["bytes_per_request"] > 0  # the PNG went to the server
        assert cell["best_baseline"] in ("edge_only", "cloud_only", "best_fixed")
        assert cell["ratio_vs_best_baseline"] > 0 and cell["gain_vs_worse_baseline"] > 0
        assert cell["splitinfer"]["warmup"]["n"] > 0
        iv = cell["ratio_intervals"]["vs_best_baseline"]
        assert iv["rounds"] >= 2 and iv["ci95"][0] <= iv["ratio"] <= iv["ci95"][1]
        assert iv["ratio"] == pytest.approx(cell["ratio_vs_best_baseline"], rel=1e-3)
        assert cell["ratio_vs_same_config"] > 0 and cell["ratio_intervals"]["vs_same_config"]["upper95"] > 0

    t = d["drop_trace"]
    assert t["requests"] > 0 and t["answered"] == t["requests"]
    assert len(t["trace"]) == t["requests"]
    assert {"t_rel_s", "wall_ms", "split"} <= set(t["trace"][0])
    assert any(r["t_rel_s"] < 0 for r in t["trace"]) and any(r["t_rel_s"] > 0 for r in t["trace"])
    measured = [c for c in t["candidates_at_new_condition"] if "p95_ms" in c]
    assert {"cloud_only", "edge_only"} <= {c["config"] for c in measured}
    assert all(c["answered"] == c["n"] for c in measured)
    assert t["p95_ratio"] > 0 and t["p95_ratio_vs_short_run"] > 0
    assert t["replay"]["answered"] == t["replay"]["requests"] > 0 and t["replay"]["after"]["n"] > 0

    st = d["startup_trace"]
    for variant in ("as_built", "with_initial_probe"):
        v = st[variant]
        assert v["requests"] > 0 and v["answered"] == v["requests"], variant
        assert len(v["timeline"]) == v["requests"]
