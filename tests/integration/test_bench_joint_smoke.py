"""bench.joint runs end to end on a small setting and reports every summary figure the issue asks for."""

from __future__ import annotations

import json

import pytest

from bench import joint

pytestmark = pytest.mark.slow


def test_bench_joint_smoke(tmp_path):
    out = tmp_path / "joint.json"
    report = joint.main(["--out", str(out), "--variants", "lowrank-0.5", "--repeats", "3", "--splits", "4",
                         "--validation-limit", "1000", "--workdir", str(tmp_path / "w")])
    s = report["summary"]
    for key in ("cells", "cells_joint_le_sequential", "cells_joint_10pct_better", "verified_cells",
                "verified_max_ratio", "exits_splits_within_epsilon", "planning_time_ratio"):
        assert key in s
    assert s["cells"] == 15
    # joint searches a superset of sequential's configurations under the same constraints
    assert s["cells_joint_le_sequential"] == 15
    for c in report["cells"]:
        assert c["joint"]["disagreement_bound"] <= 0.05 and c["sequential"]["disagreement_bound"] <= 0.05
    cert = report["certification"]
    assert set(cert) == {"0.01", "0.02", "0.05"}
    assert all(v["within"] + v["rejected"] <= 4 for v in cert.values())
    assert s["planning_time_ratio"] > 0
    assert json.loads(out.read_text())["summary"] == s
    assert out.with_suffix(".png").stat().st_size > 10_000
