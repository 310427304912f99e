"""Certified exits end to end on the committed default model: plan -> runtime thresholds -> drift monitor."""

import numpy as np
import pytest
import torch

from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from partitioner.calibrate import recalibrate_bundle
from partitioner.cost import Link
from partitioner.make import make_default_plan
from splitinfer.bundle import load_bundle
from splitinfer.calibration import CalibrationTooSmall
from splitinfer.data import fashion_mnist_dir, load_fashion_mnist, to_model_input
from tests.support.fakes import FakeClient

pytestmark = [
    pytest.mark.slow,  # calibrates exits on Fashion-MNIST (about 35 s)
    pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                       reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"),
]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "bundle"
    result = make_default_plan(out, Link(5e6, 0.02), splits="interior", repeats=3, validation_limit=3000)
    return result


def _runtime(path, window=200):
    bundle = load_bundle(path)
    settings = EdgeSettings(bundle=path, server="127.0.0.1:1", drift_window=window)
    return EdgeRuntime(bundle, FakeClient(bundle), settings, metrics=EdgeMetrics())


def test_plan_records_certified_calibration_and_uses_its_rates(planned):
    plan = planned.plan
    cal = plan.exit_calibration
    assert cal is not None and cal.mode == "certified" and cal.epsilon == 0.01 and cal.delta == 0.05
    assert cal.p_value is not None and cal.p_value <= cal.delta
    assert sum(cal.exit_rates.values()) > 0
    # the cost model's offload rate at the chosen split is 1 - the rates of the exits the plan enables
    assert set(plan.active_exits) == set(plan.active_exit_rates) == set(planned.chosen.exits)
    assert all(b <= plan.split for b in plan.active_exits)
    head_rate = sum(plan.active_exit_rates.values())
    assert planned.chosen.offload_rate == pytest.approx(1 - head_rate, abs=1e-3)
    if set(plan.active_exits) == {b for b in cal.exit_rates if b <= plan.split}:
        # the same thresholds on the whole validation sample vs on its test half (calibration's figures):
        # equal up to the sampling noise of 1,500 samples (about 0.013 for a rate near 0.4)
        assert plan.active_exit_rates == pytest.approx({b: cal.exit_rates[b] for b in plan.active_exits}, abs=0.04)
    assert {e.boundary: e.val_exit_rate for e in plan.exits} == pytest.approx(cal.exit_rates, abs=1e-4)


def test_drift_monitor_quiet_on_test_data_and_alarmed_by_inverted_images(planned):
    test = load_fashion_mnist("test")
    x = to_model_input(test.images[:400], planned.plan.input.mean, planned.plan.input.std)
    rt = _runtime(planned.path)
    try:
        for i in range(300):
            rt.infer(x[i : i + 1])
        assert rt.drift.score < rt.drift.threshold and rt.drift.alerts == 0
        inverted = to_model_input(255 - test.images[:300], planned.plan.input.mean, planned.plan.input.std)
        for i in range(300):
            rt.infer(inverted[i : i + 1])
        assert rt.drift.drifting and rt.drift.alerts == 1
        text = rt.metrics.render().decode()
        assert "splitinfer_edge_drift_alerts_total 1.0" in text
        score = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith("splitinfer_edge_drift_score ")))
        assert score > rt.drift.threshold
        assert rt.status()["drift"]["detected"] is True
    finally:
        rt.close()


def test_runtime_applies_the_certified_thresholds(planned):
    rt = _runtime(planned.path)
    test = load_fashion_mnist("test")
    x = to_model_input(test.images[:50], planned.plan.input.mean, planned.plan.input.std)
    thresholds = {e.boundary: e.threshold for e in planned.plan.exits}
    try:
        for i in range(50):
            r = rt.infer(x[i : i + 1])
            with torch.inference_mode():
                h = x[i : i + 1]
                expected = "cloud"
                prev = 0
                for b in rt.head_exits:
                    h = rt.engine.bundle.staged.run(h, prev, b)
                    prev = b
                    if torch.softmax(rt.engine.bundle.exits[b](h), 1).max().item() >= thresholds[b]:
                        expected = b
                        break
            assert r.decided_by == expected
    finally:
        rt.close()


def test_calibrate_exits_refuses_a_too_small_calibration_set(planned, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(planned.path, copy)
    with pytest.raises(CalibrationTooSmall, match=r"at least \d+"):
        recalibrate_bundle(copy, 0.01, 0.05, limit=200)
    cal = recalibrate_bundle(copy, 0.02, 0.05, limit=3000, score="margin")
    plan = load_bundle(copy).plan
    assert plan.exit_calibration.epsilon == 0.02 and plan.exit_calibration.score == "margin"
    assert all(e.score == "margin" for e in plan.exits)
    assert np.isclose(sum(cal.exit_rates), sum(plan.exit_calibration.exit_rates.values()), atol=1e-4)


def test_calibrate_exits_cli_refuses_too_small_set_and_says_how_many(planned, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from partitioner.cli import app
    from splitinfer.calibration import min_calibration_samples

    copy = tmp_path / "cli"
    shutil.copytree(planned.path, copy)
    before = (copy / "plan.json").read_text()
    result = CliRunner().invoke(app, ["calibrate-exits", "--bundle", str(copy), "--limit", "300"])
    assert result.exit_code == 2
    need = min_calibration_samples(0.01, 0.05)
    assert f"needs at least {need} samples in the test part" in result.output
    assert (copy / "plan.json").read_text() == before  # nothing written on refusal
