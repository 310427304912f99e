"""An int8 head recorded in the bundle: validated, quantized at load from bundled calibration inputs, run by the
edge runtime between its exits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from splitinfer.bundle import HeadSpec, load_bundle, read_plan, save_bundle
from splitinfer.compression.int8 import SegmentedHead
from splitinfer.errors import BundleError
from tests.support.bundles import TEST_EXITS, TEST_SPLIT, make_test_bundle
from tests.support.fakes import make_runtime

CUTS = [0, *TEST_EXITS, TEST_SPLIT]


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    src = make_test_bundle(tmp_path_factory.mktemp("fp32") / "b", thresholds=(1.1, 1.1))  # exits never fire
    fp32 = load_bundle(src)
    plan = fp32.plan.model_copy(update={"head": HeadSpec(kind="int8", cuts=CUTS, calibration_images=64)})
    out = tmp_path_factory.mktemp("int8") / "b"
    torch.manual_seed(0)
    save_bundle(out, plan, fp32.staged.model, fp32.exits, head_calibration=torch.randn(64, 1, 28, 28))
    return out


def test_int8_head_is_built_from_the_bundle_and_follows_fp32(int8_dir):
    b = load_bundle(int8_dir)
    head = b.edge_head()
    assert isinstance(head, SegmentedHead) and head.cuts == CUTS
    assert b.edge_head() is head  # built once
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        for lo, hi in zip(CUTS, CUTS[1:], strict=False):
            ref = b.staged.run(x, 0, hi)
            out = head.run(x, 0, hi)
            assert out.shape == ref.shape
            assert float((out - ref).norm() / ref.norm()) < 0.1, (lo, hi)


def test_edge_runtime_runs_the_int8_head(int8_dir):
    b = load_bundle(int8_dir)
    rt, client = make_runtime(b)
    try:
        assert rt.op.backend.head is b.edge_head()  # the quantized head runs the planned split
        res = rt.infer(torch.randn(1, 1, 28, 28), "q1")
    finally:
        rt.close()
    assert res.outcome == "cloud" and client.calls == 1


def test_int8_head_needs_calibration_inputs_and_consistent_cuts(tmp_path, int8_dir):
    d = tmp_path / "nocal"
    shutil.copytree(int8_dir, d)
    (d / "head_calibration.safetensors").unlink()
    with pytest.raises(BundleError, match="missing head_calibration"):
        load_bundle(d)
    d = tmp_path / "cuts"
    shutil.copytree(int8_dir, d)
    plan = json.loads((d / "plan.json").read_text())
    plan["head"]["cuts"] = [0, TEST_SPLIT]
    (d / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match="cuts"):
        load_bundle(d)
    fp32 = load_bundle(int8_dir)
    with pytest.raises(BundleError, match="calibration"):
        save_bundle(tmp_path / "x", read_plan(int8_dir), fp32.staged.model, fp32.exits)
