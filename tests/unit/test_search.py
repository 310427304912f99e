"""The configuration search: constraints, objectives, exit subsets, the Pareto set and the grid."""

import pytest

from partitioner.cost import Link
from partitioner.profile import Profile
from partitioner.search import CodecOption, Constraints, ExitConfig, Objective, Planner, best, pareto_front
from splitinfer.bundle import SplitEstimate
from splitinfer.energy import get_profile


def _profile(n=4):
    # payload shrinks with depth; stages cost 2 ms each; head memory grows with the split
    return Profile(machine="t", threads=1, repeats=1, stage_ms=[2.0] * n, exit_ms={1: 0.2, 2: 0.2},
                   encode_ms=[0.1] * (n + 1), decode_ms=[0.1] * (n + 1),
                   payload_bytes=[40_000, 20_000, 5_000, 1_000, 100], fp32_bytes=[1] * (n + 1),
                   stage_params=[1] * n, head_peak_bytes=[0, 100, 200, 300, 400], output_bytes=40)


def _exit_config(subset):
    rates = {1: 0.3, 2: 0.2}
    drops = {1: 0.8, 2: 0.3}
    return ExitConfig(exits=subset, rates={b: rates[b] for b in subset}, drop_points=sum(drops[b] for b in subset),
                      agreement=1 - sum(drops[b] for b in subset) / 100)


def _planner(**kw):
    p = _profile()
    return Planner([CodecOption("uint8-affine", p, p)], list(range(5)), _exit_config, [1, 2],
                   device=get_profile("raspberry-pi-4"), **kw)


def test_every_exit_subset_is_a_configuration():
    est = _planner().evaluate(Link(10e6, 0.02))
    at3 = {tuple(e.exits) for e in est if e.split == 3}
    assert at3 == {(), (1,), (2,), (1, 2)}
    assert {tuple(e.exits) for e in est if e.split == 1} == {(), (1,)}
    e12 = next(e for e in est if e.split == 3 and e.exits == [1, 2])
    assert e12.offload_rate == pytest.approx(0.5) and e12.accuracy_drop_points == pytest.approx(1.1)
    assert e12.expected_bytes == pytest.approx(0.5 * 1000)


def test_constraints_filter_and_can_exclude_everything():
    planner = _planner()
    link = Link(1e6, 0.02)
    free = planner.choose(link)
    assert free.exits  # exits pay off on a slow link
    strict = planner.choose(link, constraints=Constraints(max_accuracy_drop=0.0))
    assert strict.exits == [] and strict.accuracy_drop_points == 0
    small = planner.choose(link, constraints=Constraints(max_edge_memory=150))
    assert small.split <= 1
    few = planner.choose(Link(1e9, 0.001), constraints=Constraints(max_bytes=2_000))
    assert few.split >= 3 or few.offload_rate == 0
    with pytest.raises(ValueError, match="no configuration"):
        planner.choose(link, constraints=Constraints(max_edge_memory=50, max_bytes=10))


def test_objectives_pick_different_configurations():
    planner = _planner()
    link = Link(200e6, 0.001)
    fast = planner.choose(link, Objective("latency"))
    frugal = planner.choose(link, Objective("bytes"))
    assert frugal.expected_bytes <= fast.expected_bytes
    assert frugal.expected_bytes == min(e.expected_bytes for e in planner.evaluate(link))
    energy = planner.choose(link, Objective("energy"))
    assert energy.expected_energy_j == min(e.expected_energy_j for e in planner.evaluate(link))
    w = planner.choose(link, Objective.parse("weighted", "latency=1,bytes=1"))
    assert w in planner.evaluate(link)
    with pytest.raises(ValueError):
        Objective.parse("weighted", "")
    with pytest.raises(ValueError):
        Objective.parse("weighted", "speed=1")
    with pytest.raises(ValueError):
        Objective.parse("fastest")


def test_pareto_front_has_no_dominated_member():
    def est(lat, energy, nbytes, drop):
        return SplitEstimate(split=0, expected_latency_ms=lat, edge_ms=0, transfer_ms=0, server_ms=0,
                             bytes_per_offload=nbytes, offload_rate=1.0, exits=[], expected_energy_j=energy,
                             expected_bytes=nbytes, accuracy_drop_points=drop)

    a, b, c, d = est(1, 1, 10, 0), est(2, 0.5, 10, 0), est(3, 2, 20, 0), est(0.5, 3, 5, 1)
    front = pareto_front([a, b, c, d])
    assert c not in front and {id(x) for x in front} == {id(a), id(b), id(d)}
    planner = _planner()
    link = Link(5e6, 0.02)
    full = planner.pareto(link)
    everything = planner.evaluate(link)
    assert best(full).expected_latency_ms == min(e.expected_latency_ms for e in everything)
    for x in full:
        for y in everything:
            assert not (y.expected_latency_ms < x.expected_latency_ms and y.expected_energy_j < x.expected_energy_j
                        and y.expected_bytes < x.expected_bytes
                        and y.accuracy_drop_points < x.accuracy_drop_points)


def test_grid_moves_the_split_with_bandwidth():
    points = _planner().grid([0.1e6, 1000e6], [0.001])
    slow, fast = points
    assert slow.split >= fast.split
    assert slow.bandwidth_bps == 0.1e6 and slow.rtt_ms == pytest.approx(1.0)
    assert 0 < slow.expected_agreement <= 1
