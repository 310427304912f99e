"""Learned codecs reaching plans: ``plan make --bottlenecks auto`` (trained by the planner within a budget, at
boundaries it names with reasons) and ``--bottlenecks DIR`` for a torchvision model with random weights."""

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


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitinfer", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_auto_trains_where_the_planner_predicts_a_gain(tmp_path):
    import dataclasses

    import torch

    from partitioner.auto_bottleneck import AutoBottlenecks
    from partitioner.cost import Link
    from partitioner.make import make_default_plan
    from partitioner.profile import profile_model
    from partitioner.weights import load_default
    from splitinfer.bundle import load_bundle
    from splitinfer.codec import get_codec

    # Profiles with fixed times (an edge whose first stages are cheap and the rest slow, a fast server), so that
    # which boundaries pay does not depend on how loaded this machine is while the test runs: a small codec
    # after the cheap stages beats sending the input file on slow links by a clear margin (~5 % of the
    # expected latency over the grid; with a uniform 2 ms per stage the margin was ~0 and the test flaky).
    _, staged, exits, _ = load_default()
    measured = profile_model(staged, exits, get_codec("uint8-affine"), torch.zeros(1, 1, 28, 28), repeats=1,
                             threads=1, model_name="default")
    n = measured.num_stages

    def fixed(stage_ms: list[float]):
        return dataclasses.replace(measured, stage_ms=stage_ms, stage_ms_stats=[],
                                   exit_ms={b: 0.2 for b in measured.exit_ms}, encode_ms=[0.15] * n,
                                   decode_ms=[0.05] * n)

    edge = fixed([0.2] * 5 + [3.0] * (n - 5))
    server = fixed([0.01] * n)
    lines: list[str] = []
    auto = AutoBottlenecks(budget_s=60, count=1, train_images=256, echo=lines.append)
    result = make_default_plan(tmp_path / "b", Link(1e6, 0.02), repeats=2, validation_limit=700,
                               edge_profile=edge, server_profile=server, auto_bottlenecks=auto,
                               max_codec_drop=100.0)
    chosen = [line for line in lines if "chose boundary" in line]
    assert len(chosen) == 1 and "grid cells" in chosen[0], lines
    assert [r["status"] for r in auto.report] == ["trained"]
    k = auto.report[0]["boundary"]
    plan = result.plan
    assert plan.learned_boundaries() == [k]
    assert f"bottlenecks_auto_{k}" in plan.notes and f"learned_codec_{k}_bytes_mean" in plan.notes
    assert sorted(load_bundle(result.path).learned_codecs) == [k]


def test_torchvision_model_plans_with_a_codec_directory(tmp_path):
    codecs = tmp_path / "codecs"
    train = _cli("train-bottleneck", "--model", "resnet18", "--input-shape", "3,64,64", "--boundary", "5",
                 "--train-limit", "128", "--test-limit", "64", "--epochs-float", "1", "--epochs-qat", "1",
                 "--out-dir", str(codecs), "--threads", "1", "--no-progress")
    assert train.returncode == 0, train.stderr[-2000:]
    assert "random teacher" in train.stdout + train.stderr
    made = _cli("make", "--model", "resnet18", "--input-shape", "3,64,64", "--bottlenecks", str(codecs),
                "--repeats", "2", "--bandwidth", "1mbit", "--max-codec-drop", "100", "--out", str(tmp_path / "b"),
                "--no-progress")
    assert made.returncode == 0, made.stderr[-2000:]
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert [c["params"]["boundary"] for c in plan["learned_codecs"]] == [5]
    assert "codec_5.safetensors" in plan["files"]
    assert "random teacher" in plan["notes"]["learned_codec_figures"]
    # the same seeded random weights in both commands: the codec agrees with the model it was trained on
    assert plan["notes"]["learned_codec_5_validation_agreement"] > 0.5

    missing = _cli("make", "--model", "resnet18", "--input-shape", "3,64,64", "--bottlenecks",
                   str(tmp_path / "nowhere"), "--repeats", "2", "--out", str(tmp_path / "c"), "--no-progress")
    assert missing.returncode != 0
    assert "--bottlenecks must be committed, auto, none or a directory" in missing.stderr
    assert "Traceback" not in missing.stderr
