"""DriftMonitor: the running counts give the same score as recounting the window, and drift is flagged."""

from __future__ import annotations

import random

from edge_agent.drift import DriftMonitor, total_variation

RATES = {3: 0.5, 6: 0.3}
EDGES = [0.1 * k for k in range(1, 10)]


def _recount(mon: DriftMonitor) -> float:
    """The score from the windows' contents, counted afresh."""
    n = len(mon._decisions)
    live = [sum(1 for d in mon._decisions if d == i) / n for i in range(len(mon.reference))]
    score = total_variation(live, mon.reference)
    if len(mon._bins) >= mon.window // 2:
        m = len(mon._bins)
        hist = [sum(1 for b in mon._bins if b == i) / m for i in range(10)]
        score = max(score, total_variation(hist, [0.1] * 10))
    return score


def test_running_counts_match_a_recount_at_every_request():
    rng = random.Random(7)
    mon = DriftMonitor(RATES, EDGES, window=40, threshold=0.2, evaluate_every=1)
    checked = 0
    for _ in range(1000):
        exit_ = rng.choice([3, 6, None])
        score, _ = mon.observe(rng.random() if rng.random() < 0.8 else None, exit_)
        if len(mon._decisions) == mon.window:
            assert abs(score - _recount(mon)) < 1e-9
            checked += 1
    assert checked > 900


def test_a_shifted_input_distribution_is_flagged_once():
    mon = DriftMonitor(RATES, EDGES, window=50, threshold=0.2)
    for i in range(50):  # calibration-like: rates 0.5 / 0.3 / 0.2, scores spread over the deciles
        mon.observe((i % 10) / 10 + 0.05, 3 if i % 10 < 5 else 6 if i % 10 < 8 else None)
    assert not mon.drifting and mon.score < 0.2
    alerts = [mon.observe(0.02, None)[1] for _ in range(50)]  # every request now goes past the exits
    assert mon.drifting and sum(alerts) == 1 and mon.alerts == 1


def test_the_score_is_computed_every_few_requests_and_an_alert_comes_at_most_that_late():
    rng = random.Random(3)
    mon = DriftMonitor(RATES, EDGES, window=40, threshold=0.2, evaluate_every=8)
    scores = []
    for _ in range(200):
        exit_ = rng.choice([3, 3, 6, None])
        scores.append(mon.observe(rng.random(), exit_)[0])
    # scored at the first full window (request 40), then every 8th: the score holds in between
    changes = [i for i in range(1, 200) if scores[i] != scores[i - 1]]
    assert changes and changes[0] == 39 and all((i - 39) % 8 == 0 for i in changes)
    assert abs(scores[-1] - _recount(mon)) < 1e-9  # the last request (index 199 = 39 + 20 x 8) was scored
    late = DriftMonitor(RATES, EDGES, window=50, threshold=0.2, evaluate_every=16)
    for i in range(50):
        late.observe((i % 10) / 10 + 0.05, 3 if i % 10 < 5 else 6 if i % 10 < 8 else None)
    alerts = [late.observe(0.02, None)[1] for _ in range(60)]
    assert late.drifting and sum(alerts) == 1
    first = alerts.index(True)
    exact = DriftMonitor(RATES, EDGES, window=50, threshold=0.2, evaluate_every=1)
    for i in range(50):
        exact.observe((i % 10) / 10 + 0.05, 3 if i % 10 < 5 else 6 if i % 10 < 8 else None)
    first_exact = [exact.observe(0.02, None)[1] for _ in range(60)].index(True)
    assert first_exact <= first < first_exact + 16
