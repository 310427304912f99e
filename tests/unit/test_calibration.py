"""Learn-then-Test calibration of exit thresholds: binomial tails, sample sizes, refusal, validity."""

import math

import numpy as np
import pytest
import torch

from splitinfer.calibration import (
    NEVER,
    CalibrationTooSmall,
    ExitScores,
    apply,
    binom_cdf,
    binom_upper_bound,
    calibrate,
    evaluate,
    min_calibration_samples,
)
from splitinfer.head import score_logits

MACS_TO, EXIT_MACS, FULL_MACS = [10, 20], [1, 2], 40


def synthetic(n: int, rng: np.random.Generator, error_scale=(0.4, 0.2)) -> ExitScores:
    """Exits (one per ``error_scale``, at most two) with uniform confidence c; an exit disagrees with the full
    model with probability ``scale * (1 - c)``."""
    k = len(error_scale)
    full = rng.integers(0, 10, n)
    conf = rng.random((k, n))
    wrong = rng.random(conf.shape) < np.asarray(error_scale)[:, None] * (1 - conf)
    pred = np.where(wrong, (full + 1) % 10, full)
    return ExitScores([2, 5][:k], conf, pred, full, MACS_TO[:k], EXIT_MACS[:k], FULL_MACS)


# --------------------------------------------------------------------------------------- binomial tails


def test_binom_cdf_known_values():
    assert binom_cdf(5, 10, 0.5) == pytest.approx(0.623046875, abs=1e-12)
    assert binom_cdf(0, 10, 0.5) == pytest.approx(0.5**10, rel=1e-12)
    assert binom_cdf(-1, 10, 0.5) == 0.0
    assert binom_cdf(10, 10, 0.3) == 1.0
    assert binom_cdf(12, 10, 0.3) == 1.0
    for n, p, k in ((30, 0.1, 3), (299, 0.01, 0), (1500, 0.01, 8), (7, 0.9, 6)):
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binom_cdf(k, n, p) == pytest.approx(exact, rel=1e-9)


def test_min_calibration_samples():
    assert min_calibration_samples(0.01, 0.05) == 299
    n = min_calibration_samples(0.01, 0.05)
    assert (1 - 0.01) ** n <= 0.05 < (1 - 0.01) ** (n - 1)
    assert min_calibration_samples(0.005, 0.05) == 598
    with pytest.raises(ValueError):
        min_calibration_samples(0.0, 0.05)
    with pytest.raises(ValueError):
        min_calibration_samples(0.01, 1.0)


def test_binom_upper_bound():
    ub = binom_upper_bound(0, 299, 0.05)
    assert ub == pytest.approx(1 - 0.05 ** (1 / 299), abs=1e-9)  # closed form for k = 0
    assert ub == pytest.approx(0.01, abs=1e-4) and ub <= 0.01
    assert binom_upper_bound(0, 0, 0.05) == 1.0
    bounds = [binom_upper_bound(k, 1000, 0.05) for k in range(0, 30, 5)]
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(b > k / 1000 for b, k in zip(bounds, range(0, 30, 5), strict=True))
    assert binom_cdf(10, 1000, binom_upper_bound(10, 1000, 0.05)) == pytest.approx(0.05, abs=1e-6)


# --------------------------------------------------------------------------------------- confidence


def test_confidence_scores_on_hand_made_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    p2 = torch.softmax(logits[2], 0)
    s = score_logits(logits.numpy(), "max_softmax")
    assert s.label[1] == 0 and s.label[2] == 2
    assert s.score.tolist() == pytest.approx([0.25, 0.5, p2.max().item()], abs=1e-6)
    assert s.confidence.tolist() == pytest.approx(s.score.tolist())
    c = score_logits(logits.numpy(), "margin").score
    assert c.tolist() == pytest.approx([0.0, 1 / 3, (p2[2] - p2[0]).item()], abs=1e-6)
    c = score_logits(logits.numpy(), "neg_entropy").score
    expected = [-math.log(4), 0.5 * math.log(0.5) + 3 * (1 / 6) * math.log(1 / 6), (p2 * p2.log()).sum().item()]
    assert c.tolist() == pytest.approx(expected, abs=1e-6)
    assert all(v <= 0 for v in c.tolist())
    with pytest.raises(ValueError, match="unknown confidence score"):
        score_logits(logits.numpy(), "nope")


# --------------------------------------------------------------------------------------- apply / evaluate


def test_apply_and_evaluate_by_hand():
    full = np.array([1, 2, 3, 4])
    conf = np.array([[0.9, 0.1, 0.1, 0.95], [0.2, 0.8, 0.1, 0.9]])
    pred = np.array([[1, 0, 0, 0], [0, 2, 0, 4]])
    s = ExitScores([2, 5], conf, pred, full, MACS_TO, EXIT_MACS, FULL_MACS)
    where, answer = apply(s, [0.5, 0.5])
    assert where.tolist() == [0, 1, 2, 0]  # the earliest confident exit answers; 2 = the full model
    assert answer.tolist() == [1, 2, 3, 0]
    out = evaluate(s, [0.5, 0.5])
    assert out.disagreements == 1 and out.exit_rates == [0.5, 0.25]
    # exit 0 costs 10 + 1, exit 1 costs 20 + 1 + 2, the full model 40 + 1 + 2
    assert out.mean_macs == pytest.approx((11 + 23 + 43 + 11) / 4)
    off = evaluate(s, [NEVER, NEVER])
    assert off.disagreements == 0 and off.exit_rates == [0.0, 0.0] and off.mean_macs == 43


# --------------------------------------------------------------------------------------- calibrate


def test_too_small_calibration_set_is_refused_with_the_needed_count():
    s = synthetic(200, np.random.default_rng(0))
    with pytest.raises(CalibrationTooSmall) as err:
        calibrate(s, 0.01, 0.05, path_fraction=0.5)
    msg = str(err.value)
    assert "299" in msg  # test-part samples needed with zero disagreements
    assert "598" in msg  # in all, with half the set spent on the path
    assert "200" in msg


def test_perfectly_agreeing_exits_fire_on_everything():
    rng = np.random.default_rng(1)
    s = synthetic(2000, rng, error_scale=(0.0, 0.0))
    c = calibrate(s, 0.01, 0.05, path_fraction=0.5, seed=3)
    assert c.mode == "certified" and c.disagreements == 0
    assert c.certified_steps == c.path_steps - 1  # the whole path is certified
    assert sum(c.exit_rates) >= 0.99
    fresh = evaluate(synthetic(5000, rng, error_scale=(0.0, 0.0)), c.thresholds)
    assert sum(fresh.exit_rates) >= 0.99 and fresh.disagreements == 0
    assert not c.notes


def test_always_wrong_exits_never_fire():
    rng = np.random.default_rng(2)
    s = synthetic(2000, rng)
    s.pred = np.tile((s.full_pred + 1) % 10, (2, 1))  # every exit answer disagrees with the full model
    # Confidences quantised to 0.1: the first step of the path releases ~5% of the samples at once. (With
    # continuous confidences the first step releases a handful of samples, possibly none of the test part,
    # and certifying that nearly-never-firing configuration would be correct.)
    s.conf = np.round(s.conf, 1)
    c = calibrate(s, 0.01, 0.05, path_fraction=0.5, seed=0)
    assert c.thresholds == [NEVER, NEVER]
    assert c.certified_steps == 0 and c.exit_rates == [0.0, 0.0] and c.disagreements == 0
    assert any("no exit configuration could be certified" in note for note in c.notes)


def test_certified_choice_passes_its_own_test():
    s = synthetic(3000, np.random.default_rng(4))
    c = calibrate(s, 0.05, 0.05, path_fraction=0.5, seed=1)
    assert c.n_path + c.n_test == 3000 and c.n_test == 1500
    assert c.p_value is not None and c.p_value <= 0.05
    assert c.p_value == pytest.approx(binom_cdf(c.disagreements, c.n_test, 0.05))
    assert c.upper_bound <= 0.05 + 1e-6
    assert sum(c.exit_rates) > 0.3  # a non-trivial configuration


def test_empirical_mode_keeps_calibration_disagreement_within_epsilon():
    s = synthetic(1500, np.random.default_rng(5))
    for eps in (0.01, 0.02, 0.05):
        c = calibrate(s, eps, 0.05, mode="empirical")
        assert c.mode == "empirical" and c.p_value is None and c.upper_bound is None
        assert evaluate(s, c.thresholds).disagreement <= eps
        assert c.empirical_disagreement <= eps
        assert sum(c.exit_rates) > 0
    with pytest.raises(ValueError):
        calibrate(s, 0.01, 0.05, mode="bogus")


def test_certified_thresholds_bound_the_true_risk_in_repeated_draws():
    """Validity: P[true risk of the chosen thresholds > epsilon] <= delta over calibration draws."""
    eps, delta, reps, n_cal = 0.05, 0.1, 100, 400
    rng = np.random.default_rng(6)
    population = synthetic(200_000, rng, error_scale=(0.4,))  # one exit; stands in for the true distribution
    ok, exit_rate = 0, 0.0
    for r in range(reps):
        c = calibrate(synthetic(n_cal, rng, error_scale=(0.4,)), eps, delta, path_fraction=0.5, seed=r)
        true = evaluate(population, c.thresholds)
        ok += true.disagreement <= eps
        exit_rate += sum(true.exit_rates) / reps
    assert ok >= (1 - delta) * reps - 0.05 * reps
    assert exit_rate > 0.3  # the guarantee is not met vacuously by never exiting
