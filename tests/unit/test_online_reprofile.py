"""Online re-profiling and the predicted-latency selection rule (edge_agent/reprofile.py, edge_agent/adapt.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edge_agent.adapt import OperatingPointSelector, can_predict
from edge_agent.link import LinkController, selection_rule
from edge_agent.metrics import EdgeMetrics
from edge_agent.reprofile import ConfigResiduals, OnlineProfile
from partitioner.cost import Link, estimate_split
from partitioner.profile import Profile
from partitioner.search import prediction_parts
from splitinfer.bundle import OperatingPoint


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _point(split, edge_ms, server_ms=0.0, q=0.0, req=0.0, resp=0.0, bw=10e6, rtt_ms=20.0, exits=()):
    return OperatingPoint(bandwidth_bps=bw, rtt_ms=rtt_ms, split=split, codec="uint8-affine", exits=list(exits),
                          expected_latency_ms=1.0, expected_bytes=req * q, edge_part_ms=edge_ms, server_ms=server_ms,
                          offload_rate=q, request_bytes=req, response_bytes=resp)


EDGE = _point(4, 20.0)  # edge-only: 20 ms on the device as profiled
CLOUD = _point(0, 1.0, server_ms=10.0, q=1.0, req=10_000, resp=100, bw=100e6)  # encode 1 ms, 10 kB up


def test_parts_reproduce_the_planners_prediction_at_its_cell():
    p = Profile(machine="t", threads=1, repeats=1, stage_ms=[1.0, 2.0, 3.0, 4.0], exit_ms={2: 0.5},
                encode_ms=[0.1] * 5, decode_ms=[0.2] * 5, payload_bytes=[5000, 3000, 2000, 800, 0],
                fp32_bytes=[4000] * 5, output_bytes=40, request_overhead_ms=0.3)
    for link in (Link(8e6, 0.010), Link(0.5e6, 0.150)):
        for k in range(5):
            e = estimate_split(k, p, p, {2: 0.25} if k >= 2 else {}, link)
            point = OperatingPoint(bandwidth_bps=link.bandwidth_bps, rtt_ms=link.rtt_s * 1e3, split=k,
                                   codec="uint8-affine", exits=e.exits, expected_latency_ms=e.expected_latency_ms,
                                   expected_bytes=0.0, **prediction_parts(e, link))
            assert point.predicted_ms(link.bandwidth_bps, link.rtt_s) == pytest.approx(e.expected_latency_ms,
                                                                                       abs=1e-3)
            # another link: the same as the planner's estimate there
            other = Link(2e6, 0.05)
            again = estimate_split(k, p, p, {2: 0.25} if k >= 2 else {}, other)
            assert point.predicted_ms(2e6, 0.05) == pytest.approx(again.expected_latency_ms, abs=1e-3)
            # a device twice as slow doubles the edge part only
            assert point.predicted_ms(2e6, 0.05, edge_scale=2.0) == pytest.approx(
                again.expected_latency_ms + point.edge_part_ms, abs=1e-3)


def test_online_profile_is_a_ratio_of_means_after_enough_samples_and_clamped():
    prof = OnlineProfile(alpha=0.5, min_samples=3, max_scale=4.0)
    prof.observe(30.0, 10.0)
    prof.observe(30.0, 10.0)
    assert prof.scales() == (1.0, 1.0)  # too few samples yet
    prof.observe(30.0, 10.0, server_ms=5.0, predicted_server_ms=10.0)
    assert prof.edge_scale == pytest.approx(3.0)
    assert prof.server_scale == 1.0  # one server sample
    # early exits: short and long requests against the same mean prediction average out
    mix = OnlineProfile(alpha=0.05, min_samples=1)
    for i in range(400):
        mix.observe(2.0 if i % 2 else 18.0, 10.0)
    assert mix.edge_scale == pytest.approx(1.0, abs=0.05)
    wild = OnlineProfile(min_samples=1, max_scale=4.0)
    wild.observe(1000.0, 1.0)
    assert wild.edge_scale == 4.0
    wild.observe(-1.0, 1.0)  # nonsense is ignored
    assert wild.snapshot()["edge_samples"] == 1
    with pytest.raises(ValueError):
        OnlineProfile(alpha=0)


def test_predicted_rule_picks_the_fastest_configuration_with_a_minimum_gain():
    clock = Clock()
    sel = OperatingPointSelector([EDGE, CLOUD], min_dwell_s=2.0, clock=clock, rule="predicted", min_gain=0.05)
    # 10 Mbit/s, 20 ms: cloud = 1 + 20 + 10100 * 8 / 10e6 * 1e3 (8.08) + 10 = 39.08 ms; edge-only 20 ms
    d = sel.update(10e6, 0.020)
    assert d is not None and d.point.split == 4 and "predicted 20 ms" in d.reason
    assert sel.update(10e6, 0.020) is None
    clock.now += 10
    # 100 Mbit/s, 5 ms: cloud 1 + 5 + 0.81 + 10 = 16.8 ms: 16 % faster than edge-only -> switch
    d = sel.update(100e6, 0.005)
    assert d is not None and d.point.split == 0
    assert d.point.bandwidth_bps == 100e6  # the cell of that configuration nearest the link
    clock.now += 10
    # 100 Mbit/s, 8 ms: cloud 19.8 ms vs edge 20: within min_gain -> stay on cloud, no flapping
    assert sel.update(100e6, 0.0085) is None
    assert sel.last_prediction == {"target_ms": pytest.approx(20.0), "current_ms": pytest.approx(20.308, abs=1e-3)}
    # a much slower link is better served on the device, but not before the dwell has passed
    clock.now += 10
    assert sel.update(1e6, 0.05).point.split == 4
    clock.now += 0.5
    assert sel.update(100e6, 0.001) is None  # dwell
    clock.now += 2
    assert sel.update(100e6, 0.001).point.split == 0


def test_predicted_rule_needs_the_parts_and_auto_falls_back_to_nearest():
    bare = OperatingPoint(bandwidth_bps=1e6, rtt_ms=5, split=1, codec="uint8-affine", exits=[],
                          expected_latency_ms=1.0, expected_bytes=1.0)
    assert can_predict([EDGE, CLOUD]) and not can_predict([EDGE, bare])
    with pytest.raises(ValueError, match="re-plan"):
        OperatingPointSelector([EDGE, bare], rule="predicted")
    plan = SimpleNamespace(operating_points=[EDGE, CLOUD], objective={"objective": "latency"})
    assert selection_rule(plan, "auto") == "predicted"
    assert selection_rule(SimpleNamespace(operating_points=[EDGE, CLOUD], objective={"objective": "energy"}),
                          "auto") == "nearest"
    assert selection_rule(SimpleNamespace(operating_points=[EDGE, bare], objective={}), "auto") == "nearest"
    with pytest.raises(ValueError, match="adapt_rule=nearest"):
        selection_rule(SimpleNamespace(operating_points=[EDGE, bare], objective={}), "predicted")


def _controller(clock, points, reprofile=True, current=(4, "uint8-affine", []), server_up=True):
    settings = SimpleNamespace(adaptive=True, adapt_margin=0.1, adapt_min_dwell_s=2.0, adapt_rule="auto",
                               adapt_min_gain=0.03, reprofile=reprofile, probe_interval_s=5.0,
                               probe_max_interval_s=15.0, probe_idle_s=0.2, probe_bytes=32768,
                               explore_every=10, explore_margin=0.10, explore_refresh_s=60.0)
    plan = SimpleNamespace(operating_points=points, objective={"objective": "latency"}, notes={})
    switched = []
    links = LinkController(plan, settings, offloader=SimpleNamespace(up=server_up), metrics=EdgeMetrics(),
                           switch=switched.append, current=current, clock=clock)
    return links, switched


@pytest.mark.parametrize("reprofile", [True, False])
def test_a_wrong_profile_is_corrected_by_the_agents_own_measurements(reprofile):
    """The table was planned for a device 3x faster than this one: edge-only predicted 20 ms, measured 60 ms.
    At 10 Mbit/s / 20 ms the cloud configuration (predicted 39 ms; 41 ms with this device's encoding) is then
    the faster; the agent finds out from its own requests, without a new plan."""
    clock = Clock()
    links, switched = _controller(clock, [EDGE, CLOUD], reprofile)
    links.estimator.observe_rtt(0.020)
    links.estimator.observe_transfer(100_000, 0.020 + 100_000 * 8 / 10e6)
    assert not links.adapt()  # as profiled, edge-only is the faster here
    for _ in range(40):
        clock.now += 0.06
        links.observe_request((4, "uint8-affine", ()), 60.0, None)  # what this device measures
        links.adapt()
    status = links.status()
    if not reprofile:
        assert switched == [] and status["online_profile"]["edge_samples"] == 0
        return
    assert [p.split for p in switched] == [0]
    assert status["online_profile"]["edge_scale"] == pytest.approx(3.0)
    assert status["rule"] == "predicted" and status["prediction"]["target_ms"] == pytest.approx(41.08)
    # offloads report the server 2x slower than profiled: the cloud configuration's prediction follows
    for _ in range(40):
        clock.now += 0.05
        links.observe_request((0, "uint8-affine", ()), 0.1, 20.0)
    assert links.profile.server_scale == pytest.approx(2.0, rel=0.01)
    # at split 0 the device computes nothing: its (tiny) time does not move the edge's scale
    assert links.profile.edge_scale == pytest.approx(3.0, rel=0.01)


def test_a_single_configuration_table_costs_the_request_path_nothing():
    """The default model's table is edge-only with exits in every cell: once in use, no switch can come, so the
    agent neither scores the table nor keeps the online profile per request."""
    clock = Clock()
    one = [_point(4, 20.0, bw=bw) for bw in (1e6, 10e6, 100e6)]
    links, switched = _controller(clock, one)
    assert links.settled and not links.learns
    links.estimator.observe_rtt(0.020)
    links.observe_request((4, "uint8-affine", ()), 60.0, None)
    assert not links.adapt() and switched == []
    assert links.profile.snapshot()["edge_samples"] == 0
    # a two-configuration table starting on one of them is not settled
    links2, _ = _controller(clock, [EDGE, CLOUD])
    assert not links2.settled and links2.learns


def test_an_agent_running_on_the_device_probes_the_idle_link_even_under_load():
    """Edge-only sends nothing: no offload measures the link, so its estimate would stay where the last offloads
    left it (after a drop, often above the new rate); the link is free, so the prober need not wait for idleness."""
    clock = Clock()
    links, _ = _controller(clock, [EDGE, CLOUD])
    links.request_started()  # continuous load
    clock.now += 6.0  # > probe_interval_s, < probe_max_interval_s
    assert not links.needs_probe()  # offloading: wait for an idle moment
    links.offloading = False
    assert links.needs_probe()


def test_a_settled_agent_probes_only_when_idle_or_overdue():
    """A single-configuration table in use (the default model's edge-only with exits): nothing to choose, so a
    probe under load would only cost requests CPU time; it waits for an idle moment or probe_max_interval_s."""
    clock = Clock()
    links, _ = _controller(clock, [EDGE])
    assert links.settled
    links.offloading = False
    links.request_started()  # continuous load
    clock.now += 6.0  # > probe_interval_s, < probe_max_interval_s
    assert not links.needs_probe()
    clock.now += 10.0  # > probe_max_interval_s
    assert links.needs_probe()
    links.request_finished()
    clock.now = 0.0
    links._last_probe = -6.0  # due, and idle for longer than probe_idle_s
    links._last_served = -1.0
    assert links.needs_probe()


def test_a_step_change_restarts_at_the_median_of_its_confirming_samples():
    from edge_agent.linkest import LinkEstimator

    est = LinkEstimator()
    est.observe_rtt(0.02)
    for _ in range(20):
        est.observe_transfer(100_000, 0.02 + 100_000 * 8 / 50e6)
    # a drop to 1 Mbit/s; the first sample after it was half sent before (4 Mbit/s)
    for bw in (4e6, 1.0e6, 0.95e6):
        est.observe_transfer(20_000, 0.02 + 20_000 * 8 / bw)
    assert est.snapshot()["changes"] == 1
    assert est.bandwidth_bps == pytest.approx(1.0e6, rel=0.02)


def test_configuration_factors_need_samples_are_capped_and_forgotten_on_a_link_change():
    res = ConfigResiduals(alpha=0.5, min_samples=3, max_factor=2.0)
    key = (0, "image", ())
    res.observe(key, 22.0, 20.0, now=0.0)
    res.observe(key, 22.0, 20.0, now=1.0)
    assert res.factor(key) == 1.0 and not res.known(key, now=1.0, refresh_s=60.0)  # too few samples
    res.observe(key, 22.0, 20.0, now=2.0)
    assert res.factor(key) == pytest.approx(1.1) and res.known(key, now=2.0, refresh_s=60.0)
    assert not res.known(key, now=62.5, refresh_s=60.0)  # measured, but not lately
    res.observe(key, 500.0, 20.0, now=3.0)  # caught in a link change: capped at 2x its prediction
    assert res.factor(key) == pytest.approx((22 + 0.5 * (40 - 22)) / 20.0)
    assert res.snapshot() == [{"split": 0, "codec": "image", "exits": [], "factor": pytest.approx(1.55),
                               "samples": 4}]
    res.clear()
    assert res.factors() == {} and res.factor(key) == 1.0
    with pytest.raises(ValueError):
        ConfigResiduals(max_factor=0.5)


# 10 Mbit/s, 5 ms: 1 + 5 + 10100 * 8 / 10e6 * 1e3 (8.08) + 5 = 19.08 ms predicted; edge-only 20 ms: a near tie
NEAR = _point(0, 1.0, server_ms=5.0, q=1.0, req=10_000, resp=100)
NEAR_KEY = (0, "uint8-affine", ())
EDGE_KEY = (4, "uint8-affine", ())


def _run(links, n, near_total, edge_total, clock):
    """``n`` requests as the runtime serves them: the explored configuration when the controller says so."""
    explored = []
    for _ in range(n):
        clock.now += 0.05
        p = links.explore_point()
        cur = links.selector.current
        key = (p.split, p.codec, tuple(p.exits)) if p is not None else (cur.split, cur.codec, tuple(cur.exits))
        explored.append(p is not None)
        if key == NEAR_KEY:
            links.observe_request(key, 1.0, 5.0, near_total)
        else:
            links.observe_request(key, edge_total, None, edge_total)
        links.adapt()
    return explored


def _link(links):
    links.estimator.observe_rtt(0.005)
    links.estimator.observe_transfer(100_000, 0.005 + 100_000 * 8 / 10e6)


def test_a_near_tie_is_decided_by_measuring_the_runner_up():
    """Cloud predicted 19.1 ms, edge-only 20 ms: the table stays on cloud. Here cloud really takes 21 ms (the
    link model is off by 10 %) and edge-only 18 ms (the device is faster than profiled, which no request at split 0
    can show). One request in ten runs edge-only until it is measured; then the agent switches to it."""
    clock = Clock()
    links, switched = _controller(clock, [EDGE, NEAR], current=(0, "uint8-affine", []))
    _link(links)
    assert not links.adapt() and links.selector.current.split == 0
    explored = _run(links, 40, near_total=21.0, edge_total=18.0, clock=clock)
    assert explored[:9] == [False] * 9 and explored[9]  # at most one request in explore_every
    assert [p.split for p in switched] == [4]
    assert links.metrics.explorations._value.get() == sum(explored) == 3  # min_samples, then measured: no more
    assert links.status()["measured_factors"][0]["factor"] == pytest.approx(21.0 / 19.08, rel=1e-3)
    # edge-only in use: cloud is measured (fresh) and slower, so nothing is explored; once its measurement is
    # older than explore_refresh_s, only if it is within the margin (21 ms is 17 % slower than 18: not)
    assert not any(_run(links, 30, near_total=21.0, edge_total=18.0, clock=clock))
    clock.now += 61.0
    assert not any(_run(links, 30, near_total=21.0, edge_total=18.0, clock=clock))
    assert [p.split for p in switched] == [4]


def test_an_error_common_to_every_configuration_causes_no_switch():
    """Both configurations take 10 % longer than predicted (say the agent's own overhead): until edge-only is
    measured it is presumed to share cloud's factor, so cloud stays the faster and no switch comes."""
    clock = Clock()
    links, switched = _controller(clock, [EDGE, NEAR], current=(0, "uint8-affine", []))
    _link(links)
    _run(links, 60, near_total=19.08 * 1.1, edge_total=22.0, clock=clock)
    assert switched == []
    assert links.metrics.explorations._value.get() == 3


def test_no_exploration_beyond_the_margin_nor_towards_a_server_that_is_down():
    clock = Clock()
    far = _point(0, 1.0, server_ms=15.0, q=1.0, req=10_000, resp=100)  # 29 ms: 45 % slower than edge-only
    links, _ = _controller(clock, [EDGE, far])
    _link(links)
    assert not any(_run(links, 30, near_total=29.0, edge_total=20.0, clock=clock))
    down, _ = _controller(clock, [EDGE, NEAR], server_up=False)  # edge-only in use, cloud within the margin
    _link(down)
    assert not any(links_explore(down, 30))


def links_explore(links, n):
    return [links.explore_point() is not None for _ in range(n)]
