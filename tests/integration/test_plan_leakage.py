"""``plan make --max-leakage``: every configuration carries its payload's measured leakage (the committed leakage
table of the default model, or ``--leakage FILE``), the chosen one stays within the bound, the bound changes the
choice, and an infeasible bound is refused naming --max-leakage and the best leakage reachable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitinfer.data import fashion_mnist_dir

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]
# a fast link and a slow edge (x20 this machine): unbounded, the planner offloads early
FAST = ["--repeats", "2", "--bandwidth", "200mbit", "--rtt", "5ms", "--edge-slowdown", "20", "--no-progress", "--json"]


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitinfer", "plan", "make", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_max_leakage_is_honoured_with_the_committed_table(tmp_path):
    from partitioner.privacy import committed_leakage
    from splitinfer.bundle import read_plan

    table = committed_leakage("default")
    assert table is not None, "the default model's leakage table is committed (bench.privacy --leakage-out)"
    free = _plan("--out", str(tmp_path / "free"), *FAST)
    assert free.returncode == 0, free.stderr
    free_plan = read_plan(tmp_path / "free")
    assert all(e.leakage_ssim is None for e in free_plan.estimates)  # no table asked for: no figures
    chosen_free = json.loads(free.stdout)
    leak_free = table.ssim(chosen_free["split"], chosen_free["codec"])
    assert leak_free > 0.5  # it sends something that leaks (cloud-only or an early split)
    bound = round(leak_free - 0.05, 3)
    bounded = _plan("--out", str(tmp_path / "bounded"), "--max-leakage", str(bound), *FAST)
    assert bounded.returncode == 0, bounded.stderr
    plan = read_plan(tmp_path / "bounded")
    chosen = json.loads(bounded.stdout)
    assert (chosen["split"], chosen["codec"]) != (chosen_free["split"], chosen_free["codec"])
    assert table.ssim(chosen["split"], chosen["codec"]) <= bound
    assert all(e.leakage_ssim is not None for e in plan.estimates)
    assert chosen["chosen"]["leakage_ssim"] <= bound
    assert plan.notes["leakage_table"].startswith("default:")
    for p in plan.operating_points:  # every operating point respects the bound too
        assert table.ssim(p.split, p.codec) <= bound
    for e in plan.pareto:
        assert e.leakage_ssim <= bound


def test_leakage_file_infeasible_bound_and_bad_tables(tmp_path):
    from partitioner.privacy import LeakageEntry, LeakageTable

    table = LeakageTable("default", 17, [LeakageEntry(0, "uint8-affine", 1.0), LeakageEntry(0, "image", 1.0),
                                         LeakageEntry(1, "uint8-affine", 0.9), LeakageEntry(13, "uint8-affine", 0.4),
                                         LeakageEntry(6, "bottleneck", 0.7)])
    path = table.save(tmp_path / "leak.json")
    r = _plan("--out", str(tmp_path / "a"), "--leakage", str(path), "--max-leakage", "0.45", "--splits", "interior",
              *FAST)
    assert r.returncode == 0, r.stderr
    chosen = json.loads(r.stdout)
    assert chosen["split"] >= 13  # only boundaries 13.. (borrowing 0.4 from 13) and edge-only are within 0.45
    # interior splits only (no edge-only, which sends nothing) and a bound below every payload: refused
    r = _plan("--out", str(tmp_path / "b"), "--leakage", str(path), "--max-leakage", "0.1", "--splits", "interior",
              *FAST)
    assert r.returncode != 0
    assert "tightest constraint is --max-leakage 0.1" in r.stderr and "best any configuration reaches is 0.4" \
        in r.stderr, r.stderr
    assert not (tmp_path / "b" / "plan.json").exists()
    # another model's table, and a file that is not a table: clear errors before any work
    other = LeakageTable("mobilenet_v2_fmnist", 40, [LeakageEntry(1, "uint8-affine", 0.5)]).save(tmp_path / "o.json")
    r = _plan("--out", str(tmp_path / "c"), "--leakage", str(other), "--max-leakage", "0.5", *FAST)
    assert r.returncode != 0 and "measured on model 'mobilenet_v2_fmnist', not 'default'" in r.stderr
    (tmp_path / "junk.json").write_text("[1, 2]")
    r = _plan("--out", str(tmp_path / "d"), "--leakage", str(tmp_path / "junk.json"), "--max-leakage", "0.5", *FAST)
    assert r.returncode != 0 and "is not a leakage table" in r.stderr
    r = _plan("--out", str(tmp_path / "e"), "--max-leakage", "1.5", *FAST)
    assert r.returncode != 0 and "--max-leakage" in r.stderr
