"""The link controller: the link estimate (bandwidth, RTT), the active prober, and the operating-point
selector that turns estimates into switches. Shared by the agent's daemon (a background task calls
:meth:`LinkController.tick`) and ``bench/edge_worker.py``.

Offloads feed the estimate for free (:meth:`observe_transfer`). When the agent is idle (no request for
``probe_idle_s``) and the link has not been probed for ``probe_interval_s``, or under continuous load every
``probe_max_interval_s``, :meth:`probe` measures the RTT (ServerReady) and, when no offload measured the
bandwidth lately (idle, or running edge-only), the throughput (a ``probe_bytes`` message).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_agent.adapt import OperatingPointSelector, can_predict, config_key
from edge_agent.linkest import LinkEstimator
from edge_agent.metrics import EdgeMetrics
from edge_agent.offload import Offloader
from edge_agent.reprofile import ConfigResiduals, OnlineProfile
from splitinfer.errors import InvalidInput
from splitinfer.plan import OperatingPoint, Plan

log = logging.getLogger("edge_agent.link")

RESCORE_S = 0.5
"""Rule predicted: how often the selector re-scores the table for the measured speeds alone (no new link estimate)."""
PROBE_ANSWER_BYTES = 64  # the probe's small answer (an empty OK response, or another server's NOT_FOUND), roughly


class LinkController:
    """Estimator + prober + selector. ``switch(point)`` applies a selected operating point (raises
    InvalidInput when the bundle cannot run it)."""

    def __init__(self, plan: Plan, settings: Any, offloader: Offloader, metrics: EdgeMetrics,
                 switch: Callable[[OperatingPoint], None], current: tuple[int, str, list[int] | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.offloader = offloader
        self.metrics = metrics
        self.clock = clock
        self._switch = switch
        self.estimator = LinkEstimator(clock=clock)
        self._lock = threading.Lock()
        self._changes_seen = 0
        self._last_probe = clock()
        self.offloading = True  # whether the operating point in use sends anything (the runtime keeps it current)
        self._serving = 0  # requests being served now
        self._last_served = -math.inf  # clock() when the last one finished
        self._adapted_for: tuple | None = None
        self._scored_at = -math.inf
        self.profile = OnlineProfile()
        self.residuals = ConfigResiduals()
        self._since_explore = 0  # requests since the last exploration
        self.selector: OperatingPointSelector | None = None
        if settings.adaptive and plan.operating_points:
            self.selector = OperatingPointSelector(plan.operating_points, settings.adapt_margin,
                                                   settings.adapt_min_dwell_s, clock,
                                                   rule=selection_rule(plan, settings.adapt_rule),
                                                   min_gain=settings.adapt_min_gain)
            split, codec, exits = current
            here = [p for p in plan.operating_points if p.split == split and p.codec == codec
                    and (exits is None or sorted(p.exits) == sorted(exits))]
            if here:  # the cell of the planned link (plan.notes), not merely the first with this config
                bw, rtt_ms = plan.notes.get("bandwidth_bps"), plan.notes.get("rtt_ms")
                if isinstance(bw, int | float) and isinstance(rtt_ms, int | float) and bw > 0:
                    here.sort(key=lambda p: self.selector.distance(p, float(bw), float(rtt_ms) / 1e3))
                self.selector.start_at(here[0])
        self._update_settled()

    def _update_settled(self) -> None:
        """Nothing to adapt when the table holds one configuration and it is the one in use (a single-config
        table, like the default model's: edge-only with exits in every cell): the request path then skips the
        selector and the online profile altogether."""
        sel = self.selector
        self.settled = sel is None or sel.settled
        self.learns = (not self.settled and sel is not None and sel.rule == "predicted"
                       and bool(self.settings.reprofile))

    # ------------------------------------------------------------------ requests

    def request_started(self) -> None:
        with self._lock:
            self._serving += 1

    def request_finished(self) -> None:
        with self._lock:
            self._serving -= 1
            self._last_served = self.clock()

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        """An offload moved ``nbytes`` over the network in ``seconds``."""
        self.estimator.observe_transfer(nbytes, seconds)
        self.publish()

    def observe_request(self, config: tuple[int, str, tuple[int, ...]], edge_ms: float,
                        server_ms: float | None, total_ms: float | None = None) -> None:
        """A request ran ``config`` (split, codec, exits): ``edge_ms`` on the device, ``server_ms`` (reported
        queue + compute) on the server when it was offloaded, ``total_ms`` in all. Feeds the online profile and the
        configuration's measured-over-predicted factor (rule predicted)."""
        if not self.learns:
            return
        point = self.selector.config(config)
        if point is None:
            return
        # at split 0 the device runs no layer: its time says nothing of its compute speed
        self.profile.observe(edge_ms, point.edge_part_ms if config[0] > 0 else None, server_ms, point.server_ms)
        bw, rtt = self.estimator.bandwidth_bps, self.estimator.rtt_s
        if total_ms is not None and bw and rtt is not None:
            predicted = point.predicted_ms(bw, rtt)  # plain: the factor covers the speeds too (adapt.py)
            if predicted is not None:
                self.residuals.observe(config_key(point), total_ms, predicted, self.clock())

    def explore_point(self) -> OperatingPoint | None:
        """The configuration the next request should run instead of the one in use, or None (nearly always).

        Rule predicted only, at most one request in ``explore_every``: the fastest other configuration predicted
        within ``explore_margin`` of the one in use whose own latency has not been measured in the last
        ``explore_refresh_s`` (``min_samples`` requests; :class:`edge_agent.reprofile.ConfigResiduals`), and never
        one that offloads while the server is marked down. Its requests measure it, so a near tie is decided by
        what both configurations really take here; the one in use is unchanged (no switch)."""
        s = self.settings
        if not self.learns or s.explore_every <= 0:
            return None
        self._since_explore += 1
        if self._since_explore < s.explore_every:
            return None
        bw, rtt = self.estimator.bandwidth_bps, self.estimator.rtt_s
        sel = self.selector
        if not bw or rtt is None or sel.current is None:
            return None
        ranked = sel.predicted(bw, rtt, self.profile.scales(), self.residuals.factors())
        current = config_key(sel.current)
        current_ms = next((ms for ms, p in ranked if config_key(p) == current), None)
        if current_ms is None:
            return None
        now = self.clock()
        for ms, p in ranked:
            if ms > current_ms * (1.0 + s.explore_margin):
                break
            if config_key(p) == current or self.residuals.known(config_key(p), now, s.explore_refresh_s):
                continue
            if p.offload_rate and self.offloader.up is False:
                continue
            self._since_explore = 0
            self.metrics.explorations.inc()
            return p
        return None

    # ------------------------------------------------------------------ probing

    def needs_probe(self) -> bool:
        """True when the link (its RTT in particular: large offloads do not measure it) has not been probed
        for ``probe_interval_s`` and the agent is idle (no request for ``probe_idle_s``) or sends nothing (its
        operating point runs on the device: the link is free, and without probes its estimate would stay where the
        last offloads left it), or when the last probe is older than ``probe_max_interval_s`` (continuous load).

        A settled agent (nothing to switch to: :meth:`_update_settled`) probes only for the gauges and the
        server's health, so never in the midst of its requests before ``probe_max_interval_s``, even when it sends
        nothing: there the probe would only cost its requests CPU time."""
        s = self.settings
        with self._lock:
            now = self.clock()
            age = now - self._last_probe
            if age < s.probe_interval_s:
                return False
            if age >= s.probe_max_interval_s or (not self.offloading and not self.settled):
                return True  # (not offloading: the link is idle anyway, and no offload measures it)
            return self._serving == 0 and now - self._last_served >= s.probe_idle_s

    def probe(self) -> bool:
        """Active probes (see the module docstring); feeds the estimator and may switch the operating point.
        False when the server could not be reached (it is then marked down)."""
        last_bw = self.estimator.last_bandwidth_sample
        idle = last_bw is None or self.clock() - last_bw >= self.settings.probe_interval_s
        try:
            self.estimator.observe_rtt(self.offloader.probe_rtt())
            measured = self.offloader.probe_transfer(self.settings.probe_bytes) if idle else None
        except Exception as exc:  # noqa: BLE001 - a failed probe marks the server down like a failed offload
            self.offloader.mark_down(exc)
            return False
        self.offloader.mark_up()
        if measured is not None:  # request bytes + the small answer
            self.estimator.observe_transfer(measured[0] + PROBE_ANSWER_BYTES, measured[1])
        self.publish()
        with self._lock:
            self._last_probe = self.clock()
        self.adapt()
        return True

    @property
    def period_s(self) -> float:
        """How often a prober loop calls :meth:`tick`."""
        return min(1.0, self.settings.probe_interval_s)

    def tick(self) -> bool:
        """Probe if due (:meth:`needs_probe`); True when a probe ran and reached the server. Never raises (a
        prober loop must not die): an unexpected error is logged."""
        try:
            return self.needs_probe() and self.probe()
        except Exception:  # noqa: BLE001
            log.warning("link probe failed", exc_info=True)
            return False

    def publish(self) -> None:
        """Copy the estimate to the gauges; count and log newly detected step changes."""
        snap = self.estimator.snapshot()
        if snap["bandwidth_bps"]:
            self.metrics.bandwidth.set(float(snap["bandwidth_bps"]) / 8.0)  # the gauge is in bytes/s
        if snap["rtt_s"] is not None:
            self.metrics.rtt.set(float(snap["rtt_s"]))
        new = int(snap["changes"] or 0) - self._changes_seen
        if new > 0:
            self._changes_seen += new
            self.residuals.clear()  # the configurations' measured factors described the link before the change
            self.metrics.link_changes.inc(new)
            bw = "not measured yet" if not snap["bandwidth_bps"] else f"{snap['bandwidth_bps'] / 1e6:.3g} Mbit/s"
            rtt = "not measured yet" if snap["rtt_s"] is None else f"{snap['rtt_s'] * 1e3:.3g} ms"
            log.info("link change detected: bandwidth %s, RTT %s", bw, rtt)

    # ------------------------------------------------------------------ adaptation

    def adapt(self) -> bool:
        """Switch operating point if the link estimate (or, rule predicted, the measured speeds) calls for it
        (logged and counted); True if switched.

        Cheap on the request path: the selector runs when the link estimate changed, and otherwise (the speeds
        move a little with every request) at most every ``RESCORE_S``, or when a switch held back by the dwell
        time may be due."""
        if self.settled:
            return False
        estimate = (self.estimator.bandwidth_bps, self.estimator.rtt_s)
        now = self.clock()
        if estimate == self._adapted_for and (self.selector.rule != "predicted"
                                              or now - self._scored_at < RESCORE_S):
            return False
        scales, factors = (1.0, 1.0), None
        if self.settings.reprofile:
            scales, factors = self.profile.scales(), self.residuals.factors()
        self._scored_at = now
        decision = self.selector.update(*estimate, scales=scales, factors=factors)
        sel = self.selector
        dwelling = sel.last_switch is not None and sel.clock() - sel.last_switch < sel.min_dwell_s
        self._adapted_for = None if dwelling else estimate  # a switch held back by dwell is retried later
        if decision is None:
            return False
        p = decision.point
        try:
            self._switch(p)
        except InvalidInput as exc:  # a table entry this bundle cannot run: keep the current point
            log.warning("cannot switch to split %d (%s): %s", p.split, p.codec, exc)
            return False
        self.metrics.switches.inc()
        self._update_settled()
        log.info("operating point -> split %d, codec %s, exits %s (%s)", p.split, p.codec, list(p.exits),
                 decision.reason)
        return True

    def status(self) -> dict[str, Any] | None:
        """The ``adaptive`` section of ``/v1/status`` (None without a selector)."""
        sel = self.selector
        if sel is None:
            return None
        return {"switches": sel.switches, "rule": sel.rule,
                "cell": None if sel.current is None else
                {"bandwidth_bps": sel.current.bandwidth_bps, "rtt_ms": sel.current.rtt_ms},
                "margin": sel.margin, "min_gain": sel.min_gain, "min_dwell_s": sel.min_dwell_s,
                "prediction": sel.last_prediction,
                "online_profile": self.profile.snapshot() if sel.rule == "predicted" else None,
                "measured_factors": self.residuals.snapshot() if sel.rule == "predicted" else None}


def selection_rule(plan: Plan, setting: str) -> str:
    """The selector's rule for ``plan`` under the ``adapt_rule`` setting (``auto``: predicted when the table
    records its predictions' parts and the plan's objective is latency). ValueError when ``predicted`` is asked
    of a table that cannot predict."""
    predictable = can_predict(plan.operating_points)
    if setting == "predicted" and not predictable:
        raise ValueError("adapt_rule=predicted needs a bundle whose operating points record their predictions' "
                         "parts (planned by this version of splitinfer); re-plan it or use adapt_rule=nearest")
    if setting == "auto":
        return "predicted" if predictable and plan.objective.get("objective", "latency") == "latency" else "nearest"
    return setting
