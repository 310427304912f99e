"""The planner with the committed learned codec: a candidate at its boundary, carried by the bundle, and
rejected when its measured accuracy drop exceeds the limit."""

import pytest

from partitioner.cost import Link
from partitioner.make import make_default_plan
from partitioner.search import Objective
from splitinfer.bundle import load_bundle
from splitinfer.data import fashion_mnist_dir

pytestmark = [
    pytest.mark.slow,  # plans with a learned codec (about 12 s)
    pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                       reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"),
]


def test_plan_considers_and_carries_the_learned_codec(tmp_path):
    # on the demo's device and objective (latency and energy alike) the codec wins somewhere on the grid
    from splitinfer.energy import get_profile

    dev = get_profile("raspberry-pi-4")
    result = make_default_plan(tmp_path / "b", Link(0.5e6, 0.005), dev, dev.compute_slowdown, splits="interior",
                               repeats=3, validation_limit=1000,
                               objective=Objective.parse("weighted", "latency=1,energy=1"))
    plan = result.plan
    assert plan.learned_codecs
    at = plan.learned_boundaries()
    learned = [e for e in result.estimates if e.codec == "bottleneck"]
    generic = {e.split: e for e in result.estimates if e.codec == "uint8-affine"}
    assert sorted(e.split for e in learned) == at
    assert any(e.codec == "bottleneck" for e in result.pareto)
    for e in learned:
        assert e.bytes_per_offload * 20 < generic[e.split].bytes_per_offload
        assert 0 <= plan.notes[f"learned_codec_{e.split}_validation_drop_points"] <= 1.0
    assert any(p.codec == "bottleneck" for p in plan.operating_points)
    bundle = load_bundle(result.path)
    assert sorted(bundle.learned_codecs) == at
    assert all(bundle.learned_codecs[b].boundary == b for b in at)
    if plan.codec.name == "bottleneck":
        assert plan.split in at


def test_learned_codec_is_rejected_above_the_accuracy_limit(tmp_path):
    result = make_default_plan(tmp_path / "b", Link(0.5e6, 0.005), splits="interior", repeats=3,
                               validation_limit=1000, max_codec_drop=-100.0)
    assert result.plan.learned_codecs == []
    rejected = [v for k, v in result.plan.notes.items() if k.startswith("learned_codec_") and k.endswith("_rejected")]
    assert rejected and all("accuracy drop" in str(v) for v in rejected)
    assert all(e.codec == "uint8-affine" for e in result.estimates)
    assert load_bundle(result.path).learned_codecs == {}
