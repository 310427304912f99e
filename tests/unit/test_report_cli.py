"""`splitinfer plan report`: operating-point table and PNG plots from a bundle and a codec sweep."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from partitioner.cli import app
from splitinfer.bundle import LatencyCurve, OperatingPoint, SplitEstimate, read_plan
from tests.support.bundles import make_learned_bundle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep() -> dict:
    ev = {"bytes_mean": 100.0, "accuracy": 0.91, "agreement": 0.96, "reference_accuracy": 0.93, "drop_points": 2.0}
    return {"points": [{"boundary": 6, "channels": 8, "bits": 2, "fp32_bytes": 37632, "ptq": ev,
                        "qat": {**ev, "accuracy": 0.92}}],
            "references": [{"boundary": 6, "codec": "uint8-affine", "fp32_bytes": 37632, **ev, "bytes_mean": 9792.0}]}


def test_report_writes_pngs_and_prints_operating_points(tmp_path):
    d = make_learned_bundle(tmp_path / "b")
    plan = read_plan(d)
    plan = plan.model_copy(update={
        "estimates": [SplitEstimate(split=6, codec="uint8-affine", expected_latency_ms=9.0, edge_ms=1, transfer_ms=2,
                                    server_ms=1, bytes_per_offload=9792, offload_rate=0.5, exits=[])],
        "operating_points": [OperatingPoint(bandwidth_bps=bw, rtt_ms=rtt, split=8 if bw < 10e6 else 2,
                                            codec="bottleneck" if bw < 10e6 else "uint8-affine", exits=[4],
                                            expected_latency_ms=12.5 if bw < 10e6 else 7.25, expected_bytes=60.0)
                             for bw in (5e6, 50e6) for rtt in (20, 100)],
        "latency_curves": [LatencyCurve(bandwidth_bps=bw, rtt_ms=20, splits=[0, 2, 8],
                                        latency_ms=[30 * 5e6 / bw, 9, 12]) for bw in (5e6, 50e6)],
        "pareto": [SplitEstimate(split=8, codec="bottleneck", expected_latency_ms=12.5, edge_ms=1, transfer_ms=2,
                                 server_ms=1, bytes_per_offload=60, offload_rate=0.5, exits=[4],
                                 expected_bytes=30.0, accuracy_drop_points=0.4)]})
    (d / "plan.json").write_text(plan.model_dump_json())
    (d / "codec_sweep.json").write_text(json.dumps(_sweep()))
    result = CliRunner().invoke(app, ["report", str(d), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "bottleneck" in result.output and "12.50" in result.output and "7.25" in result.output
    assert "Pareto set" in result.output and "drop 0.40" in result.output
    for name in ("bytes_per_boundary.png", "rate_accuracy.png", "latency_vs_split.png", "operating_points.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC


def test_report_on_an_empty_folder_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "neither plan.json, codec_sweep.json, leakage.json nor compressed models" in result.output


def test_report_draws_compressed_variants(tmp_path):
    for name, method, acc, stored, lat in (("a", "deep", 0.925, 70000, 2.0), ("b", "lowrank", 0.92, 300000, 1.4)):
        (tmp_path / name).mkdir()
        figures = {"test_accuracy_fp32": 0.928, "test_accuracy": acc, "fp32_bytes": 1066616, "stored_bytes": stored,
                   "storage_ratio": round(1066616 / stored, 2), "mac_reduction": 0.5 if method == "lowrank" else 0.0,
                   "fp32_latency_ms": 2.0, "latency_ms": lat}
        (tmp_path / name / "compression.json").write_text(json.dumps({"method": method, "figures": figures}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compression.json").write_text("{broken")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("fp32") and "1,066,616" in line for line in lines)
    assert any(line.startswith("lowrank (b)") and "50.0" in line for line in lines)
    assert "skipping" in result.output  # the unreadable one is named, not fatal
    assert (tmp_path / "compression.png").read_bytes().startswith(PNG_MAGIC)
