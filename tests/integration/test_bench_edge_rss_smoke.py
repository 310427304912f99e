"""Smoke test of ``bench.edge_rss``: plans the demo bundle with few profiling runs, starts the real cloud server and a
fresh edge agent (torch head, then the ONNX Runtime head on the same bundle through ``--bundle``), sends a few PNG
uploads and checks the JSON's structure and that the memory figures are plausible. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitinfer.data import fashion_mnist_dir

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 12
SUMMARY_MB = ("rss_after_ready_mb", "rss_after_first_request_mb", "peak_rss_mb", "rss_final_mb")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not all((fashion_mnist_dir() / f).is_file()
                                         for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def _run(out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "bench.edge_rss", "--out", str(out), "--requests", str(REQUESTS), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "peak RSS (VmHWM)" in proc.stdout  # the table
    return json.loads(out.read_text())


def _check(d: dict, backend: str) -> None:
    assert list(d)[0] == "summary"
    s = d["summary"]
    assert s["backend"] == backend and s["runs"] == 1 and s["requests_per_run"] == REQUESTS
    assert s["all_requests_ok"] is True and s["server_up_at_ready"] is True
    for key in SUMMARY_MB:
        assert isinstance(s[key], float) and s[key] > 0, key
    # a fresh agent holds at least the interpreter, numpy and torch; and the peak is a peak
    assert 50 < s["rss_after_ready_mb"] < 16384
    assert s["peak_rss_mb"] >= s["rss_after_ready_mb"]
    assert s["peak_rss_mb"] >= s["rss_final_mb"]
    assert s["peak_rss_mb"] >= s["rss_after_first_request_mb"]
    if s["pss_final_mb"] is not None:  # smaps_rollup is readable for our own children here, but need not be
        assert 0 < s["pss_final_mb"] <= s["rss_final_mb"] + 1
        assert 0 < s["uss_final_mb"] <= s["pss_final_mb"] + 1
    assert s["anon_final_mb"] > 0 and s["file_final_mb"] > 0
    assert abs(s["anon_final_mb"] + s["file_final_mb"] - s["rss_final_mb"]) < 0.05 * s["rss_final_mb"] + 5

    assert isinstance(d["commit"], str) and len(d["commit"]) == 40
    settings = d["settings"]
    assert settings["backend"] == backend and settings["requests"] == REQUESTS
    assert settings["agent_env"]["SPLITINFER_EDGE_ADAPTIVE"] == "false"
    assert settings["agent_env"]["SPLITINFER_EDGE_HEAD_BACKEND"] == backend
    assert settings["bundle"]["model"] == "default" and settings["bundle"]["split"] > 0

    (run,) = d["runs"]
    assert run["failed"] == 0 and sum(run["answers"].values()) == REQUESTS
    assert set(run["points"]) == {"after_ready", "after_first_request", "after_requests"}
    end = run["points"]["after_requests"]
    assert end["vmhwm_mb"] == s["peak_rss_mb"] and end["threads"] >= 1
    groups = end["smaps"]["rss_mb_by_group"]
    assert groups["anon"] > 0 and groups["torch"] > 0  # the torch agent maps libtorch, whatever the build
    assert end["smaps"]["top_mappings"] and all(m["rss_mb"] >= 0 for m in end["smaps"]["top_mappings"])
    assert abs(sum(groups.values()) - end["vmrss_mb"]) < 0.05 * end["vmrss_mb"] + 5
    assert len(run["rss_trace"]) == REQUESTS  # one point per request when there are fewer than 50
    assert all(mb > 0 for _, mb in run["rss_trace"])


def test_bench_edge_rss_smoke(tmp_path):
    work = tmp_path / "work"
    torch_run = _run(tmp_path / "torch.json", "--repeats", "2", "--workdir", str(work), "--warmup-runs", "0")
    _check(torch_run, "torch")
    assert torch_run["settings"]["bundle_source"].startswith("planned here")
    assert torch_run["settings"]["repeats"] == 2

    onnx_run = _run(tmp_path / "onnx.json", "--backend", "onnx", "--bundle", str(work / "bundle"),
                    "--workdir", str(work), "--agent-env", "SPLITINFER_EDGE_LOG_LEVEL=warning")
    _check(onnx_run, "onnx")
    assert onnx_run["settings"]["bundle_source"] == "given"
    assert torch_run["settings"]["warmup_runs"] == 0 and onnx_run["settings"]["warmup_runs"] == 1
    assert onnx_run["settings"]["agent_env"]["SPLITINFER_EDGE_LOG_LEVEL"] == "warning"
    assert onnx_run["settings"]["bundle"]["split"] == torch_run["settings"]["bundle"]["split"]
