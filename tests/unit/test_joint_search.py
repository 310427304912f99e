"""Joint planning's pieces: the batched per-sample codec round trip, end-to-end exit scores, lazy judging,
infeasibility messages and variant dominance."""

import math

import numpy as np
import pytest
import torch

from partitioner.cost import Link
from partitioner.joint import HeadVariant, VariantEval, pareto_mask, undominated_splits
from partitioner.profile import Profile
from partitioner.search import (
    CodecOption,
    Constraints,
    ExitConfig,
    Objective,
    Planner,
    choose_among,
    explain_infeasible,
    lazy_pareto,
)
from splitinfer.calibration import ExitScores, calibrate, evaluate
from splitinfer.codec import UInt8AffineCodec


@pytest.mark.parametrize("shape", [(5, 32, 28, 28), (4, 96, 1, 1), (3, 96), (6, 48, 14, 14), (2, 10), (1, 3, 7, 7)])
def test_batched_uint8_round_trip_equals_each_sample_encoded_alone(shape):
    codec = UInt8AffineCodec()
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen) * 3 + 1
    x[0].fill_(0.5)  # a constant sample: scale 0 becomes 1, as in encode
    one_by_one = torch.cat([codec.decode(*codec.encode(x[i : i + 1])) for i in range(shape[0])])
    assert torch.equal(codec.roundtrip_each(x), one_by_one)


def _scores(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 10, n)
    conf = rng.random((2, n))
    pred = np.where(conf > 0.5, ref, (ref + 1) % 10)  # confident exits agree with the reference
    return ExitScores([2, 4], conf, pred, ref.copy(), [10, 20], [1, 1], 40), ref


def test_disagreement_is_counted_against_the_reference_not_the_fallback():
    s, ref = _scores()
    never = [math.inf, math.inf]
    assert evaluate(s, never).disagreements == 0
    wrong = (ref + 3) % 10
    fallback = ref.copy()
    fallback[:100] = wrong[:100]  # the deployed system (codec, compressed head) differs on 100 samples
    e2e = s.with_fallback(fallback, ref)
    assert evaluate(e2e, never).disagreements == 100
    assert evaluate(e2e.subset(np.arange(50)), never).disagreements == 50
    only = e2e.only_exits([4])
    assert only.boundaries == [4] and only.conf.shape == (1, 2000) and only.reference is e2e.reference
    with pytest.raises(ValueError, match="fallback/reference"):
        s.with_fallback(fallback[:10], ref)


def test_the_end_to_end_certificate_leaves_the_exits_only_what_the_fallback_does_not_use():
    s, ref = _scores(4000)
    clean = calibrate(s, 0.05, 0.05)
    fallback = ref.copy()
    fallback[::40] = (ref[::40] + 1) % 10  # 2.5 % of the answers already wrong without any exit
    noisy = calibrate(s.with_fallback(fallback, ref), 0.05, 0.05)
    assert sum(noisy.exit_rates) < sum(clean.exit_rates)
    fallback[::10] = (ref[::10] + 1) % 10  # 10 %: not even 'no exit' can be certified at 5 %
    with pytest.raises(Exception, match="cannot be certified|too small"):
        calibrate(s.with_fallback(fallback, ref), 0.05, 0.05)


def _profile(stage_ms, n=4):
    return Profile(machine="t", threads=1, repeats=1, stage_ms=list(stage_ms), exit_ms={},
                   encode_ms=[0.1] * (n + 1), decode_ms=[0.1] * (n + 1),
                   payload_bytes=[40_000, 20_000, 5_000, 1_000, 100], fp32_bytes=[1] * (n + 1),
                   stage_params=[1] * n, head_peak_bytes=[0, 100, 200, 300, 400], output_bytes=40)


def _planner(head="fp32", stage_ms=(2.0, 2.0, 2.0, 2.0), bundle=1000, system=None):
    p = _profile(stage_ms)
    return Planner([CodecOption("uint8-affine", p, p)], list(range(5)), lambda s: ExitConfig(s, {}), [],
                   head=head, bundle_bytes=bundle, system=system)


def test_choose_judges_best_first_and_only_until_one_passes():
    judged = []

    def judge(e):
        judged.append(e.split)
        e.disagreement = 0.0
        e.disagreement_bound = 0.5 if e.split == 4 else 0.01  # edge-only (the fastest here) fails the screen

    planner = _planner(stage_ms=(0.1, 0.1, 0.1, 0.1), system=judge)
    cons = Constraints(epsilon=0.05)
    chosen = planner.choose(Link(1e6, 0.05), Objective(), cons)
    assert judged[0] == 4 and chosen.split != 4
    assert len(judged) == 2  # the runner-up passed: nothing else was judged
    assert chosen.disagreement_bound == 0.01


def test_lazy_pareto_drops_members_that_fail_and_recomputes():
    def judge(e):
        e.disagreement = 0.0
        e.disagreement_bound = 0.5 if e.split in (3, 4) else 0.01

    planner = _planner(system=judge)
    front = planner.pareto(Link(1e6, 0.05), Constraints(epsilon=0.05))
    assert front and all(e.split not in (3, 4) and e.disagreement_bound == 0.01 for e in front)
    assert lazy_pareto(planner.evaluate(Link(1e6, 0.05)), Constraints(), None)  # no judge: plain front


def test_infeasible_constraints_name_the_tightest_and_the_best_value_reachable():
    est = _planner(bundle=5000).evaluate(Link(1e6, 0.05))
    cons = Constraints(max_bundle_bytes=1000, max_edge_memory=250)
    assert not any(cons.admits(e) for e in est)
    msg = explain_infeasible(est, cons)
    assert "--max-bundle-bytes 1000" in msg and "best any configuration reaches is 5000 bytes" in msg
    with pytest.raises(ValueError, match="tightest constraint is --max-bundle-bytes"):
        choose_among(est, Objective(), cons)
    # memory alone: three of five splits fit in 250 bytes
    msg = explain_infeasible(est, Constraints(max_edge_memory=250))
    assert "--max-edge-memory 250: 3 of 5 configurations" in msg and "reaches is 0 bytes" in msg


def _eval(name, stage_ms, agreement, weights=1000):
    p = _profile(stage_ms)
    v = HeadVariant(name, torch.nn.Identity(), None, None, None, weights, False, "test")
    return VariantEval(v, p, p, None, agreement)


def test_pareto_mask_keeps_ties_and_drops_dominated_rows():
    assert pareto_mask([[1, 1], [1, 1], [2, 2], [0, 3]]) == [True, True, False, True]


def test_dominated_variants_are_pruned_per_split():
    fp32 = _eval("fp32", (2, 2, 2, 2), 1.0, weights=4000)
    fast = _eval("fast", (1, 1, 1, 1), 0.98, weights=2000)
    worse = _eval("worse", (2, 2, 2, 2), 0.97, weights=500)  # fp32's speed, lower agreement, fewer bytes
    kept = undominated_splits([fp32, fast, worse], range(5), Constraints())
    assert kept["worse"] == []  # dominated everywhere when bytes do not matter
    assert kept["fp32"] == list(range(5))  # best agreement
    assert kept["fast"] == list(range(5))  # faster head (and tail)
    kept = undominated_splits([fp32, fast, worse], range(5), Constraints(max_bundle_bytes=10_000))
    assert kept["worse"] == list(range(5))  # the smallest bundle: it may be the only one to fit


def test_calibrating_at_several_epsilons_from_one_path_equals_calibrating_at_each():
    from splitinfer.calibration import calibrate_each

    s, ref = _scores(4000, seed=3)
    fallback = ref.copy()
    fallback[::60] = (ref[::60] + 1) % 10
    e2e = s.with_fallback(fallback, ref)
    several = calibrate_each(e2e, [0.005, 0.03, 0.05], 0.05, seed=7)
    assert several[0] is None  # 1.7 % already wrong without exits: 0.5 % cannot be certified
    for eps, cal in zip([0.03, 0.05], several[1:], strict=True):
        one = calibrate(e2e, eps, 0.05, seed=7)
        assert cal.thresholds == one.thresholds and cal.disagreements == one.disagreements


def test_the_system_judge_runs_the_tail_only_where_no_exit_answers():
    from partitioner.joint import SystemJudge, codec_roundtrip, split_answers
    from partitioner.weights import load_default

    net, staged, _exits, _info = load_default(None, "default")
    n, codec = staged.num_stages, "uint8-affine"
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = staged.run(x, 0, n).argmax(1).numpy()
    rng = np.random.default_rng(3)
    conf = rng.random((2, 64))
    pred = rng.integers(0, 10, (2, 64))
    scores = ExitScores([6, 8], conf, pred, full, [1, 2], [1, 1], 3).with_fallback(full, full)
    seen: list[int] = []
    plain = codec_roundtrip(UInt8AffineCodec())

    def counting(f, rows):
        seen.extend(int(r) for r in rows)
        return plain(f, rows)

    ev = VariantEval(HeadVariant("fp32", net, staged, None, None, 0, True, "test"), None, None, scores, 1.0)
    ev.roundtrips = {codec: counting}
    judge = SystemJudge(ev, x, None, 0.05, {6: 0.6, 8: 0.6})
    expected_fallback = split_answers(staged, x, {codec: ([6], plain)})[(6, codec)]
    fired, exit_answer = judge._exits((6,))
    assert 0 < fired.sum() < 64
    got = judge.answers(6, codec, (6,))
    assert np.array_equal(got, np.where(fired, exit_answer, expected_fallback))
    assert sorted(seen) == list(np.flatnonzero(~fired))  # the tail ran on the rows no exit answered, only
    assert np.array_equal(judge.answers(6, codec, ()), expected_fallback)  # no exit: every row
    assert sorted(seen) == list(range(64))  # each row computed once
    assert (6, codec) not in ev.answered  # complete now
    assert np.array_equal(judge.fallback(6, codec), expected_fallback) and len(seen) == 64
