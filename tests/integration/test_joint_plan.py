"""Joint planning end to end: the chosen head variant ships in the bundle, the certificate covers the final
answers, and --max-bundle-bytes / --max-edge-memory hold on what was written (measured), with clear errors
when nothing can meet them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from partitioner.cost import Link
from partitioner.head_memory import measure
from partitioner.make import make_default_plan
from partitioner.search import Constraints
from splitinfer.bundle import load_bundle
from splitinfer.energy import get_profile

pytestmark = pytest.mark.slow
PI = get_profile("raspberry-pi-4")


def _plan(out, **kw):
    return make_default_plan(out, Link(2e6, 0.05), PI, PI.compute_slowdown, epsilon=0.05, repeats=3,
                             validation_limit=1000, head_variants=kw.pop("variants", ["lowrank-0.5"]), **kw)


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint") / "bundle"
    return _plan(out, constraints=Constraints(max_bundle_bytes=900_000)), 900_000


def test_max_bundle_bytes_holds_on_the_written_bundle(small_bundle):
    result, limit = small_bundle
    plan = result.plan
    assert _dir_bytes(result.path) <= limit
    assert plan.notes["head_variant"] == "lowrank-0.5"  # fp32's bundle (~1.5 MB) cannot fit
    assert plan.model.compression and plan.model.compression["method"] == "lowrank"
    assert result.chosen.head == "lowrank-0.5" and result.chosen.bundle_bytes <= limit


def test_the_bundle_runs_the_chosen_variant_and_carries_the_end_to_end_certificate(small_bundle):
    result, _ = small_bundle
    jr = result.joint
    bundle = load_bundle(result.path)
    x = jr.inputs.x_val[:64]
    with torch.inference_mode():
        shipped = bundle.staged.run(x, 0, bundle.staged.num_stages)
        planned = jr.variant.variant.staged.run(x, 0, bundle.staged.num_stages)
    assert torch.equal(shipped, planned)
    cal = bundle.plan.exit_calibration
    assert cal.epsilon == 0.05 and cal.mode == "certified" and cal.upper_bound <= 0.05 + 1e-9
    assert "end to end" in bundle.plan.notes["certificate"]
    # the certificate's test part counted disagreement against fp32's answers, not the variant's own
    s = jr.system_scores
    assert s.reference is not None and not np.array_equal(s.reference, s.full_pred)


def test_the_certified_thresholds_keep_the_accuracy_constraint(tmp_path):
    # a certificate at epsilon may spend the whole budget on exits; the plan must still meet --max-accuracy-drop
    result = _plan(tmp_path / "b", variants="all", constraints=Constraints(max_accuracy_drop=0.5))
    c = result.chosen
    assert c.accuracy_drop_points is not None and c.accuracy_drop_points <= 0.5
    assert c.disagreement_bound <= 0.05
    assert result.plan.exit_calibration.epsilon <= 0.05


def test_an_infeasible_bundle_limit_names_the_constraint(tmp_path):
    with pytest.raises(ValueError, match=r"tightest constraint is --max-bundle-bytes 1000.*best any configuration "
                                         r"reaches is \d+ bytes"):
        _plan(tmp_path / "b", constraints=Constraints(max_bundle_bytes=1000))


def test_max_edge_memory_is_measured_on_the_written_bundle(tmp_path):
    limit = 40_000_000
    result = _plan(tmp_path / "b", variants=["lowrank-0.5"], constraints=Constraints(max_edge_memory=limit))
    recorded = result.plan.notes["edge_memory_measured_bytes"]
    assert 0 < recorded <= limit
    again = measure(result.path)
    assert again["peak_reset"] and 0 < again["head_peak_bytes"] <= limit
    assert again["computed_bytes"] < again["head_peak_bytes"]  # the computed figure misses the runtime's own memory


def test_an_infeasible_memory_limit_names_the_constraint(tmp_path):
    # cloud-only computes to 0 bytes on the edge, but loading the bundle costs megabytes: measured, refused
    with pytest.raises(ValueError, match=r"--max-edge-memory 1000: no configuration is left under it \(lowest "
                                         r"measured: \S+ split \d+, \d+ B"):
        _plan(tmp_path / "b", constraints=Constraints(max_edge_memory=1000))


def test_a_bundle_limit_without_head_variants_is_refused_not_ignored(tmp_path):
    with pytest.raises(ValueError, match="--max-bundle-bytes needs --head-variants"):
        make_default_plan(tmp_path / "b", Link(2e6, 0.05), constraints=Constraints(max_bundle_bytes=10**9))


def test_the_cli_names_the_committed_variants_for_an_unknown_one(tmp_path):
    out = subprocess.run([sys.executable, "-m", "splitinfer", "plan", "make", "--out", str(tmp_path / "b"),
                          "--head-variants", "nope", "--no-progress"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "head variant 'nope'" in out.stderr and "lowrank-0.5" in out.stderr
