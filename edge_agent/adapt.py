"""Choosing the operating point from the bundle's table as the link estimate moves, with hysteresis.

The plan's ``operating_points`` tabulate the configuration chosen for each (bandwidth, RTT) of a grid. The
estimate is placed on the grid in log space (``log bandwidth``, ``log RTT``); the nearest cell's configuration
is the target. To avoid flapping between neighbouring cells when the estimate sits near their border:

* **margin**: the target cell must be nearer than the current cell by ``margin`` (in log units: 0.1 is ~10 %);
* **dwell**: at least ``min_dwell_s`` since the last switch (the first choice is immediate);
* a target whose configuration equals the current one is no switch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from splitinfer.plan import OperatingPoint


@dataclass(frozen=True)
class Decision:
    """A switch to ``point`` and why."""

    point: OperatingPoint
    reason: str


def _key(p: OperatingPoint) -> tuple:
    return (p.split, p.codec, tuple(p.exits))


class OperatingPointSelector:
    """Maps link estimates to the table's operating points; see the module docstring."""

    def __init__(self, points: Sequence[OperatingPoint], margin: float = 0.1, min_dwell_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not points:
            raise ValueError("the plan has no operating points to switch between")
        self.points = list(points)
        self.margin = margin
        self.min_dwell_s = min_dwell_s
        self.clock = clock
        self.current: OperatingPoint | None = None
        self.last_switch: float | None = None
        self.switches = 0

    @staticmethod
    def distance(p: OperatingPoint, bandwidth_bps: float, rtt_s: float) -> float:
        """How far ``p``'s grid cell lies from the link (bit/s, s), in log(bandwidth), log(RTT) space."""
        rtt_ms = max(rtt_s * 1e3, 1e-3)
        return math.hypot(math.log(p.bandwidth_bps / bandwidth_bps), math.log(max(p.rtt_ms, 1e-3) / rtt_ms))

    def nearest(self, bandwidth_bps: float, rtt_s: float) -> OperatingPoint:
        return min(self.points, key=lambda p: self.distance(p, bandwidth_bps, rtt_s))

    def start_at(self, point: OperatingPoint) -> None:
        """Declare the configuration in use (no switch counted)."""
        self.current = point

    def update(self, bandwidth_bps: float | None, rtt_s: float | None) -> Decision | None:
        """The switch to make now, if any, for these estimates (None: stay)."""
        if not bandwidth_bps or rtt_s is None or bandwidth_bps <= 0 or rtt_s < 0:
            return None
        target = self.nearest(bandwidth_bps, rtt_s)
        now = self.clock()
        if self.current is not None:
            if _key(target) == _key(self.current):
                self.current = target  # same configuration, nearer cell: adopt it silently
                return None
            d_target = self.distance(target, bandwidth_bps, rtt_s)
            d_current = self.distance(self.current, bandwidth_bps, rtt_s)
            if d_current - d_target < self.margin:
                return None
            if self.last_switch is not None and now - self.last_switch < self.min_dwell_s:
                return None
        reason = (f"link estimate {bandwidth_bps / 1e6:.3g} Mbit/s, RTT {rtt_s * 1e3:.3g} ms -> cell "
                  f"{target.bandwidth_bps / 1e6:g} Mbit/s / {target.rtt_ms:g} ms")
        self.current = target
        self.last_switch = now
        self.switches += 1
        return Decision(target, reason)
