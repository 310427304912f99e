"""Ranking boundaries for ``plan make --bottlenecks auto`` on synthetic profiles of the default model."""

from partitioner.auto_bottleneck import BoundaryScore, choose_boundaries, rank_boundaries
from partitioner.cost import Link
from partitioner.profile import Profile
from partitioner.search import CodecOption, Planner
from partitioner.weights import load_default


def _profile(staged, stage_ms: float) -> Profile:
    n = staged.num_stages
    fp32 = [int(b.fp32_bytes) for b in staged.boundaries]
    return Profile(machine="test", threads=1, repeats=1, stage_ms=[stage_ms] * n, exit_ms={},
                   encode_ms=[0.05] * (n + 1), decode_ms=[0.05] * (n + 1),
                   payload_bytes=[max(1, f // 4) for f in fp32], fp32_bytes=fp32,
                   stage_macs=[1_000_000] * n)


def _planner(staged, edge_ms: float) -> Planner:
    n = staged.num_stages
    edge, server = _profile(staged, edge_ms), _profile(staged, 0.05)
    return Planner([CodecOption("uint8-affine", edge, server)], list(range(n + 1)))


def test_slow_uplink_and_slow_edge_rank_interior_boundaries_by_saving():
    _, staged, _, _ = load_default()
    planner = _planner(staged, edge_ms=2.0)
    links = [Link(0.5e6, 0.02), Link(1e6, 0.005)]
    scores = rank_boundaries(planner, staged, links, bits=2)
    n = staged.num_stages
    assert scores and all(0 < s.boundary < n and len(s.shape) == 3 for s in scores)
    assert all(s.payload_bytes < s.fp32_bytes for s in scores)
    savings = [s.mean_saving for s in scores]
    assert savings == sorted(savings, reverse=True)
    assert savings[0] > 0 and scores[0].cells_won >= 1
    assert "grid cells" in scores[0].reason(len(links))


def test_nothing_is_trained_where_the_edge_is_free():
    _, staged, _, _ = load_default()
    scores = rank_boundaries(_planner(staged, edge_ms=0.0), staged, [Link(0.5e6, 0.02)])
    assert all(s.mean_saving == 0 for s in scores)
    assert choose_boundaries(scores, 3) == []


def test_choice_keeps_one_boundary_per_shape_and_the_count():
    def score(b: int, shape: list[int], saving: float) -> BoundaryScore:
        return BoundaryScore(b, shape, 10, 1000, saving, 1)

    scores = [score(5, [32, 14, 14], 0.5), score(6, [32, 14, 14], 0.45), score(8, [48, 7, 7], 0.3),
              score(9, [64, 7, 7], 0.2), score(10, [96, 7, 7], 0.1)]
    assert [s.boundary for s in choose_boundaries(scores, 3)] == [5, 8, 9]
    assert [s.boundary for s in choose_boundaries(scores, 1)] == [5]
