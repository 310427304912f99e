"""bench.e2e's measurement design: Williams orders, screening, the same-configuration rule, bootstrap intervals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bench.e2e import SCREEN_FACTOR, ratio_interval, same_config, screen, williams_orders


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_williams_orders_balance_first_order_carry_over(n):
    rows = williams_orders(n)
    assert len(rows) == (n if n % 2 == 0 else 2 * n)
    for row in rows:
        assert sorted(row) == list(range(n))
    follows = {(a, b): 0 for a, b in itertools.permutations(range(n), 2)}
    for row in rows:
        for a, b in zip(row, row[1:], strict=False):
            follows[(a, b)] += 1
    assert len(set(follows.values())) <= 1  # every configuration runs right after every other equally often
    for pos in range(n):  # and takes each position equally often
        assert len({sum(row[pos] == c for row in rows) for c in range(n)}) == 1


def test_same_config_ignores_the_codec_at_edge_only_and_reads_none_as_any():
    assert same_config((17, "uint8-affine", [6, 11]), (17, "learned", [11, 6]), 17)
    assert not same_config((6, "uint8-affine", []), (6, "learned", []), 17)
    assert same_config((17, None, None), (17, "x", [6]), 17)
    assert not same_config((17, None, [6]), (17, None, [6, 11]), 17)
    assert not same_config((0, "image", []), (6, "image", []), 17)


def _recs(means_by_round, spread=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"round": r, "wall_ms": float(m + rng.normal(0, spread))} for r, m in enumerate(means_by_round)
            for _ in range(5)]


def test_ratio_interval_covers_the_ratio_and_shrinks_with_rounds():
    slow_spells = np.where(np.arange(40) % 7 == 0, 3.0, 1.0)  # the machine's slow rounds hit both alike
    a, b = _recs(slow_spells * 1.02, 0.05, 1), _recs(slow_spells, 0.05, 2)
    iv = ratio_interval(a, b)
    assert iv["rounds"] == 40 and iv["ci95"][0] <= iv["ratio"] <= iv["ci95"][1] <= iv["upper95"] * 1.5
    assert iv["ratio"] == pytest.approx(1.02, abs=0.01)
    assert iv["ci95"][0] > 1.0  # a 2 % difference is resolved with 40 paired rounds
    few = ratio_interval(a[:20], b[:20])
    assert few["ci95"][1] - few["ci95"][0] > iv["ci95"][1] - iv["ci95"][0]
    assert ratio_interval(a[:5], b)["upper95"] is None  # one shared round: no interval


def test_screen_drops_far_baselines_but_never_the_kept_ones():
    records = {"splitinfer": _recs([10.0] * 4), "edge_only": _recs([10.0 * SCREEN_FACTOR * 1.1] * 4),
               "best_fixed": _recs([9.5] * 4), "cloud_only": _recs([50.0] * 4)}
    out = screen(records, list(records), keep={"splitinfer", "cloud_only"})
    assert set(out) == {"edge_only"} and "after" in out["edge_only"]
