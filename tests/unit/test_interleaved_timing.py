"""Head variants are timed interleaved, so that a slow spell of the machine is shared, not pinned on one."""

import pytest
import torch

import partitioner.profile as profile
from partitioner.profile import time_stages_interleaved


def test_models_are_timed_in_turn_every_round_and_summarised_by_their_medians(monkeypatch):
    calls = []
    spell = {"left": 0}

    def fake_time_stages(staged, exits, x0, runs, warmup, bar):
        calls.append((staged, runs, warmup))
        base = {"a": 1e-3, "b": 2e-3}[staged.name]
        # a slow spell (10x) hits whichever model is timed during it: 3 calls long, starting at the 4th call
        if len(calls) == 4:
            spell["left"] = 3
        slow = 10.0 if spell["left"] > 0 else 1.0
        spell["left"] = max(0, spell["left"] - 1)
        t = [base * slow] * runs
        return [t, t], {3: [base * slow / 2] * runs}, []

    class Fake:
        def __init__(self, name):
            self.name, self.num_stages = name, 2

    monkeypatch.setattr(profile, "_time_stages", fake_time_stages)
    a, b = Fake("a"), Fake("b")
    out = time_stages_interleaved({"a": a, "b": b}, {3: None}, torch.zeros(2, 1, 4, 4), runs=25, rounds=5,
                                  warmup=4)
    # one untimed warm-up of each, then 5 rounds of a, b with ceil(25 / 5) = 5 timed walks each
    assert [(c[0].name, c[1], c[2]) for c in calls] == [("a", 0, 4), ("b", 0, 4)] + [("a", 5, 0), ("b", 5, 0)] * 5
    assert len(out["a"].stages) == 2
    # the spell covered a, b, a's rounds 1-2: each model's median is its own speed, its mean is not
    assert out["a"].stages[0].p50 == pytest.approx(1.0) and out["b"].stages[1].p50 == pytest.approx(2.0)
    assert out["a"].exits[3].p50 == pytest.approx(0.5)
    assert out["a"].stages[0].mean > 1.0 and out["b"].stages[0].mean > 2.0
