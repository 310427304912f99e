"""Link estimation (passive + probes, change detection) and operating-point selection with hysteresis."""

from __future__ import annotations

import pytest

from edge_agent.adapt import OperatingPointSelector
from edge_agent.linkest import LinkEstimator
from splitinfer.bundle import OperatingPoint


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _transfer(est, nbytes, bw, rtt):
    est.observe_transfer(nbytes, rtt + nbytes * 8 / bw)


def test_estimator_separates_rtt_and_bandwidth():
    est = LinkEstimator()
    assert est.rtt_s is None and est.bandwidth_bps is None
    for _ in range(5):
        est.observe_rtt(0.050)
    for n in (20_000, 200_000, 50_000, 120_000):
        _transfer(est, n, 10e6, 0.050)
    assert est.rtt_s == pytest.approx(0.050, rel=1e-6)
    assert est.bandwidth_bps == pytest.approx(10e6, rel=0.01)
    snap = est.snapshot()
    assert snap["bandwidth_samples"] == 4 and snap["changes"] == 0


def test_small_transfers_only_refine_the_rtt():
    est = LinkEstimator()
    est.observe_rtt(0.020)
    _transfer(est, 100_000, 2e6, 0.020)
    bw = est.bandwidth_bps
    _transfer(est, 100, 2e6, 0.030)  # a small message: an RTT sample, not a bandwidth one
    assert est.bandwidth_bps == bw and est.rtt_s > 0.020
    est.observe_transfer(1000, 0.0)  # nonsense is ignored
    est.observe_transfer(-5, 0.1)
    assert est.bandwidth_bps == bw


def test_a_step_change_is_detected_within_a_few_samples_and_noise_is_not():
    clock = Clock()
    est = LinkEstimator(clock=clock)
    est.observe_rtt(0.010)
    import random

    rng = random.Random(0)
    for _ in range(30):  # +-20 % noise on a 50 Mbit/s link: no change
        _transfer(est, 500_000, 50e6 * rng.uniform(0.8, 1.2), 0.010)
    assert est.snapshot()["changes"] == 0
    assert est.bandwidth_bps == pytest.approx(50e6, rel=0.15)
    clock.now = 200.0
    transfers = 0
    while not est.snapshot()["changes"] and transfers < 10:  # the uplink drops to 1 Mbit/s
        _transfer(est, 50_000, 1e6, 0.010)
        transfers += 1
    assert transfers <= 4, "the drop must be detected within a few transfers"
    assert est.bandwidth_bps == pytest.approx(1e6, rel=0.5)
    assert est.last_change == 200.0


def _grid():
    pts = []
    for bw in (1e6, 10e6, 100e6):
        for rtt in (5.0, 50.0):
            split = {1e6: 17, 10e6: 6, 100e6: 0}[bw]
            pts.append(OperatingPoint(bandwidth_bps=bw, rtt_ms=rtt, split=split, codec="uint8-affine",
                                      exits=[], expected_latency_ms=1.0, expected_bytes=1.0))
    return pts


def test_selector_picks_the_nearest_cell_with_hysteresis_and_dwell():
    clock = Clock()
    sel = OperatingPointSelector(_grid(), margin=0.2, min_dwell_s=2.0, clock=clock)
    first = sel.update(9e6, 0.006)
    assert first is not None and first.point.split == 6  # the first choice is immediate
    assert sel.update(None, 0.01) is None and sel.update(5e6, -1) is None
    # 3.3 Mbit/s is about midway (in log space) between the 1 and 10 Mbit/s cells: within the margin, stay
    assert sel.update(3.3e6, 0.006) is None
    clock.now += 1.0
    assert sel.update(1.1e6, 0.006) is None  # clearly nearer 1 Mbit/s, but within the dwell time
    clock.now += 1.5
    d = sel.update(1.1e6, 0.006)
    assert d is not None and d.point.split == 17 and "Mbit/s" in d.reason
    assert sel.switches == 2
    clock.now += 10
    assert sel.update(1e6, 0.045) is None  # another cell with the same configuration is no switch
    assert sel.current.rtt_ms == 50.0
    with pytest.raises(ValueError):
        OperatingPointSelector([])
