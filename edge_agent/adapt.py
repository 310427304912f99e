"""Choosing the operating point from the bundle's table as the link estimate moves, with hysteresis.

The plan's ``operating_points`` tabulate the configuration chosen for each (bandwidth, RTT) of a grid. Two rules
turn a link estimate into a target configuration:

* **predicted** (bundles whose table records each prediction's parts, planned for latency): every distinct
  configuration of the table is scored at the estimated link with ``OperatingPoint.predicted_ms``, its edge and
  server times rescaled by what the agent measures itself, and the whole multiplied by the configuration's own
  measured-over-predicted factor once it has run (:mod:`edge_agent.reprofile`); the fastest is the target. It
  switches only when the target is predicted at least ``min_gain`` (a fraction) faster than the configuration in
  use at the same link and speeds. A near runner-up that never ran (or not lately) gets an occasional request
  of its own so that its factor is measured (:meth:`edge_agent.link.LinkController.explore_point`).
* **nearest** (older bundles, or other objectives: the table's choice then weighs energy or bytes too): the
  estimate is placed on the grid in log space (``log bandwidth``, ``log RTT``); the nearest cell's configuration
  is the target, and the target cell must be nearer than the current cell by ``margin`` (in log units: 0.1 is
  ~10 %).

Both rules hold a switch back for ``min_dwell_s`` after the last one (the first choice is immediate), and a target
whose configuration equals the current one is no switch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from splitinfer.plan import OperatingPoint


@dataclass(frozen=True)
class Decision:
    """A switch to ``point`` and why."""

    point: OperatingPoint
    reason: str


def config_key(p: OperatingPoint) -> tuple:
    """``p``'s configuration: (split, codec, exits as a tuple)."""
    return (p.split, p.codec, tuple(p.exits))


def can_predict(points: Sequence[OperatingPoint]) -> bool:
    """True when every point records its prediction's parts (``OperatingPoint.predicted_ms`` works)."""
    return bool(points) and all(p.predicted_ms(1e6, 0.01) is not None for p in points)


class OperatingPointSelector:
    """Maps link estimates (and measured speeds) to the table's operating points; see the module docstring."""

    def __init__(self, points: Sequence[OperatingPoint], margin: float = 0.1, min_dwell_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, rule: str = "nearest", min_gain: float = 0.03) -> None:
        if not points:
            raise ValueError("the plan has no operating points to switch between")
        if rule not in ("nearest", "predicted"):
            raise ValueError(f"unknown selection rule {rule!r} (nearest or predicted)")
        if rule == "predicted" and not can_predict(points):
            raise ValueError("the plan's operating points do not record their predictions' parts: re-plan the "
                             "bundle, or select by the nearest cell")
        self.points = list(points)
        self.rule = rule
        self.margin = margin
        self.min_gain = min_gain
        self.min_dwell_s = min_dwell_s
        self.clock = clock
        self.current: OperatingPoint | None = None
        self.last_switch: float | None = None
        self.switches = 0
        self.last_prediction: dict[str, float] | None = None  # the current and the target's predicted ms
        # one point per distinct configuration: a configuration's parts do not depend on the cell
        configs: dict[tuple, OperatingPoint] = {}
        for p in self.points:
            configs.setdefault(config_key(p), p)
        self.configs = list(configs.values())
        self._by_key = configs

    @property
    def settled(self) -> bool:
        """True when no switch can ever come: the table has one configuration and it is the one in use."""
        return (len(self.configs) == 1 and self.current is not None
                and config_key(self.current) == config_key(self.configs[0]))

    def config(self, key: tuple) -> OperatingPoint | None:
        """The table's point for the configuration ``key`` (split, codec, exits), or None when it has none."""
        split, codec, exits = key
        point = self._by_key.get((split, codec, tuple(exits)))
        if point is None:  # edge-only is listed under one codec name, whichever the runtime reports
            point = next((p for p in self.configs if p.split == split and p.offload_rate == 0
                          and tuple(p.exits) == tuple(exits)), None)
        return point

    @staticmethod
    def distance(p: OperatingPoint, bandwidth_bps: float, rtt_s: float) -> float:
        """How far ``p``'s grid cell lies from the link (bit/s, s), in log(bandwidth), log(RTT) space."""
        rtt_ms = max(rtt_s * 1e3, 1e-3)
        return math.hypot(math.log(p.bandwidth_bps / bandwidth_bps), math.log(max(p.rtt_ms, 1e-3) / rtt_ms))

    def nearest(self, bandwidth_bps: float, rtt_s: float) -> OperatingPoint:
        return min(self.points, key=lambda p: self.distance(p, bandwidth_bps, rtt_s))

    def nearest_of(self, config: OperatingPoint, bandwidth_bps: float, rtt_s: float) -> OperatingPoint:
        """The cell nearest the link among those whose configuration is ``config``'s."""
        same = [p for p in self.points if config_key(p) == config_key(config)] or [config]
        return min(same, key=lambda p: self.distance(p, bandwidth_bps, rtt_s))

    def predicted(self, bandwidth_bps: float, rtt_s: float, scales: tuple[float, float] = (1.0, 1.0),
                  factors: Mapping[tuple, float] | None = None) -> list[tuple[float, OperatingPoint]]:
        """Every distinct configuration's predicted latency (ms) at the link, fastest first (rule ``predicted``).

        A configuration with a measured ``factor`` (its requests' latency over its plain prediction at their link,
        :class:`edge_agent.reprofile.ConfigResiduals`) is predicted as ``predicted_ms x factor``: its own
        measurement covers the speeds and the link model alike. Any other is predicted with the speeds ``scales``
        (edge, server) and then the relative error that remains for the configuration in use when it has a factor
        (the model's error is presumed alike until measured: an error that only the configuration in use showed
        would make every other configuration look faster than it is)."""
        factors = factors or {}
        prior = 1.0
        cur = self.current
        if cur is not None and config_key(cur) in factors:
            plain, scaled = cur.predicted_ms(bandwidth_bps, rtt_s), cur.predicted_ms(bandwidth_bps, rtt_s, *scales)
            if plain and scaled:
                prior = plain * factors[config_key(cur)] / scaled
        out = []
        for p in self.configs:
            f = factors.get(config_key(p))
            ms = p.predicted_ms(bandwidth_bps, rtt_s) if f is not None else p.predicted_ms(bandwidth_bps, rtt_s,
                                                                                          *scales)
            if ms is not None:
                out.append((ms * (f if f is not None else prior), p))
        return sorted(out, key=lambda t: t[0])

    def start_at(self, point: OperatingPoint) -> None:
        """Declare the configuration in use (no switch counted)."""
        self.current = point

    def update(self, bandwidth_bps: float | None, rtt_s: float | None,
               scales: tuple[float, float] = (1.0, 1.0), factors: Mapping[tuple, float] | None = None
               ) -> Decision | None:
        """The switch to make now, if any, for these estimates (None: stay). ``scales``: the measured speed of the
        edge and the server relative to the plan's profiles; ``factors``: each configuration's measured latency
        relative to its prediction (rule ``predicted`` only)."""
        if not bandwidth_bps or rtt_s is None or bandwidth_bps <= 0 or rtt_s < 0:
            return None
        if self.rule == "predicted":
            ranked = self.predicted(bandwidth_bps, rtt_s, scales, factors)
            best_ms, best = ranked[0]
            target = self.nearest_of(best, bandwidth_bps, rtt_s)
            current_ms = None
            if self.current is not None:
                current_ms = next((ms for ms, p in ranked if config_key(p) == config_key(self.current)), None)
            self.last_prediction = {"target_ms": round(best_ms, 4),
                                    "current_ms": None if current_ms is None else round(current_ms, 4)}
        else:
            target = self.nearest(bandwidth_bps, rtt_s)
        now = self.clock()
        if self.current is not None:
            if config_key(target) == config_key(self.current):
                self.current = target  # same configuration, nearer cell: adopt it silently
                return None
            if self.rule == "predicted":
                if current_ms is not None and best_ms > current_ms * (1.0 - self.min_gain):
                    return None
            else:
                d_target = self.distance(target, bandwidth_bps, rtt_s)
                d_current = self.distance(self.current, bandwidth_bps, rtt_s)
                if d_current - d_target < self.margin:
                    return None
            if self.last_switch is not None and now - self.last_switch < self.min_dwell_s:
                return None
        reason = f"link estimate {bandwidth_bps / 1e6:.3g} Mbit/s, RTT {rtt_s * 1e3:.3g} ms -> "
        if self.rule == "predicted":
            reason += (f"predicted {best_ms:.4g} ms" + ("" if current_ms is None else f" vs {current_ms:.4g} ms")
                       + f" (edge x{scales[0]:.3g}, server x{scales[1]:.3g} the plan's profiles)")
        else:
            reason += f"cell {target.bandwidth_bps / 1e6:g} Mbit/s / {target.rtt_ms:g} ms"
        self.current = target
        self.last_switch = now
        self.switches += 1
        return Decision(target, reason)
