"""The edge worker's ``set`` can run an operating point with other exit thresholds than the bundle's (what
``bench.joint`` uses to measure each configuration as its search predicted it)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.edge_worker import with_thresholds


class _Plan:
    def thresholds(self):
        return {3: 0.9, 8: 0.95, 11: math.inf}

    def scores(self):
        return {3: "max_softmax", 8: "max_softmax", 11: "max_softmax"}


def test_without_thresholds_the_plan_decides():
    policy = with_thresholds(_Plan(), None)
    assert dict(policy.thresholds) == _Plan().thresholds()


def test_given_thresholds_replace_the_plans_and_change_the_decision():
    confident = np.log(np.array([[0.8, 0.1, 0.1]]))
    assert not with_thresholds(_Plan(), None).check(3, confident).fires
    policy = with_thresholds(_Plan(), {"3": 0.7, "11": 0.5})  # JSON keys arrive as strings
    assert dict(policy.thresholds) == {3: 0.7, 8: 0.95, 11: 0.5}
    assert policy.check(3, confident).fires
    assert not policy.check(8, confident).fires


def test_thresholds_for_an_exit_the_bundle_lacks_are_refused():
    with pytest.raises(ValueError, match=r"exits \[5\]"):
        with_thresholds(_Plan(), {5: 0.5})
