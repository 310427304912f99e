"""bench.joint runs end to end on a small setting and reports every summary figure the issue asks for."""

from __future__ import annotations

import json

import pytest

from bench import joint

pytestmark = pytest.mark.slow


def test_bench_joint_smoke(tmp_path):
    out = tmp_path / "joint.json"
    report = joint.main(["--out", str(out), "--variants", "lowrank-0.5", "--repeats", "3", "--splits", "4",
                         "--validation-limit", "1000", "--verify-cells", "2", "--cli-rounds", "0",
                         "--workdir", str(tmp_path / "w")])
    s = report["summary"]
    for key in ("cells", "cells_joint_le_sequential", "cells_joint_10pct_better", "verified_cells",
                "verified_max_ratio", "exits_splits_within_epsilon", "planning_time_ratio",
                "planning_time_ratio_in_process"):
        assert key in s
    assert s["cells"] == 15
    # joint searches a superset of sequential's configurations under the same constraints
    assert s["cells_joint_le_sequential"] == 15
    for c in report["cells"]:
        assert c["joint"]["disagreement_bound"] <= 0.05 and c["sequential"]["disagreement_bound"] <= 0.05
    cert = report["certification"]
    assert set(cert) == {"0.01", "0.02", "0.05"}
    assert all(v["within"] + v["rejected"] <= 4 for v in cert.values())
    assert s["planning_time_ratio_in_process"] > 0
    assert s["planning_time_ratio"] is None  # the `plan make` commands are not timed here (--cli-rounds 0)
    # two cells measured through the link emulator with real servers and edge workers
    ver = report["verification"]
    assert [(c["bandwidth_mbps"], c["rtt_ms"]) for c in ver["cells"]] == [(0.5, 5.0), (0.5, 50.0)]
    assert ver["edge_scale"] > 0
    for c in ver["cells"]:
        if "unverified" in c:  # the choice's head variant has no bundle in this run: said, not measured
            assert "no bundle" in c["unverified"]
            continue
        def config(d):
            return d["head"], d["split"], d["codec"], tuple(d["exits"])
        assert config(c["choice"]) in {config(m) for m in c["measured"]}
        assert all(m["measured_ms"] > 0 and m["n"] >= 34 for m in c["measured"])
        assert c["ratio"] >= 1.0 and c["verified"] == (c["ratio"] <= 1.05)
        assert c["choice_deployed_ms"] > 0  # the choice with the bundle's certified thresholds, beside
    assert s["verified_measured_cells"] == sum("ratio" in c for c in ver["cells"])
    assert s["verified_cells"] == sum(c.get("verified", False) for c in ver["cells"])
    assert json.loads(out.read_text())["summary"] == s
    assert out.with_suffix(".png").stat().st_size > 10_000
