"""Accounting for the edge agent: one :class:`RequestTrace` per request, turned into the answer's figures, the
Prometheus metrics, the energy estimate (or measurement) and the status counters in one place.

Energy (``method="model"``): compute = CPU time of the request's own work (``time.thread_time`` deltas in the
worker thread; the head runs one intra-op thread by default, so the figure is exact) times the profile's
active-minus-idle watts; radio = bytes sent and the network time of the offload (round trip minus the
server's queue and compute time; the elapsed time of a failed attempt) through the radio model. With a meter
(RAPL, INA3221) the compute part is measured over the request instead.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_agent.metrics import OUTCOMES, EdgeMetrics
from splitinfer.energy import DeviceProfile
from splitinfer.power import EnergyMeter

log = logging.getLogger("edge_agent.accounting")

LATENCY_KEYS = ("head", "exit", "encode", "transfer", "tail", "total")


@dataclass
class EdgeResult:
    """The answer to one request, with where it was decided and what it cost."""

    request_id: str
    label: int
    class_name: str
    confidence: float
    decided_by: int | str
    """Boundary index of the exit that answered, ``num_stages`` for the full model on the device, or
    ``"cloud"``."""
    degraded: bool
    """True when the server should have answered but could not (answer computed on the device instead)."""
    outcome: str
    """``edge_exit``, ``cloud`` or ``fallback`` (the ``outcome`` label of the requests counter)."""
    latency_ms: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    energy_j: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``request_id`` becomes ``id``; ``outcome`` is internal and dropped)."""
        d = asdict(self)
        d["id"] = d.pop("request_id")
        d.pop("outcome")
        return d


@dataclass(slots=True)
class RequestTrace:
    """What one request did and cost, filled in as it runs (seconds)."""

    request_id: str
    t_start: float
    cpu_start: float
    energy_start: list[int] | None = None
    latency: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LATENCY_KEYS, 0.0))
    ran: set[str] = field(default_factory=set)
    bytes_sent: int = 0
    bytes_received: int = 0
    radio_s: float = 0.0
    """Network time of the offload (for the radio energy)."""
    network_cpu_s: float = 0.0
    """CPU time spent waiting on the network (not the request's compute)."""
    cpu_end: float | None = None
    """CPU clock when the request's own compute ended (None: at the end)."""

    def add(self, part: str, seconds: float) -> None:
        """Add ``seconds`` to latency part ``part`` and mark it as run."""
        self.latency[part] += seconds
        self.ran.add(part)

    def stop_compute(self) -> None:
        """The request's own compute ends here (what follows is waiting on the server)."""
        self.cpu_end = time.thread_time()

    def compute_s(self) -> float:
        end = self.cpu_end if self.cpu_end is not None else time.thread_time()
        return max(0.0, end - self.cpu_start - self.network_cpu_s)


class Accounting:
    """Turns traces into results, metrics, energy and counters (thread-safe)."""

    def __init__(self, metrics: EdgeMetrics, profile: DeviceProfile, labels: list[str],
                 meter: EnergyMeter | None = None) -> None:
        self.metrics = metrics
        self.profile = profile
        self.labels = labels
        self.meter = meter
        self._lock = threading.Lock()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.exit_counts: dict[int, int] = {}

    def begin(self, request_id: str) -> RequestTrace:
        """Start a request's trace (reads the energy meter when there is one)."""
        energy_start = None
        if self.meter is not None:
            try:
                energy_start = self.meter.read_uj()
            except (OSError, ValueError):  # a failed sensor read costs the measurement, not the request
                log.debug("energy meter read failed; this request's compute energy is modelled", exc_info=True)
        return RequestTrace(request_id, time.perf_counter(), time.thread_time(), energy_start)

    def declare_exits(self, boundaries: list[int]) -> None:
        """Exits that may answer from now on (their counters start at 0 and survive switches)."""
        with self._lock:
            for b in boundaries:
                self.exit_counts.setdefault(b, 0)
        self.metrics.declare_exits(boundaries)

    def class_name(self, label: int) -> str:
        return self.labels[label] if 0 <= label < len(self.labels) else str(label)

    def finish(self, trace: RequestTrace, label: int, conf: float, decided_by: int | str, degraded: bool,
               outcome: str) -> EdgeResult:
        """Close the trace: observe latencies, energy and counters, and build the answer."""
        lat = trace.latency
        lat["total"] = time.perf_counter() - trace.t_start
        trace.ran.add("total")
        for stage in LATENCY_KEYS:
            if stage in trace.ran:
                self.metrics.duration.labels(stage=stage).observe(lat[stage])
        energy = {"compute": self.profile.compute_joules(trace.compute_s()),
                  "radio": self.profile.radio_joules(trace.bytes_sent, trace.radio_s)
                  if "transfer" in trace.ran else 0.0}
        methods = {"compute": "model", "radio": "model"}
        if self.meter is not None and trace.energy_start is not None:
            try:  # measured package energy over the request (the radio stays modelled: RAPL cannot see it)
                energy["compute"] = self.meter.joules_between(trace.energy_start, self.meter.read_uj())
                methods["compute"] = self.meter.method
            except (OSError, ValueError):
                log.warning("energy meter unreadable; using the power model", exc_info=True)
        for component, joules in energy.items():
            self.metrics.energy.labels(component=component, method=methods[component]).inc(joules)
        if trace.bytes_sent:
            self.metrics.bytes_sent.inc(trace.bytes_sent)
        if trace.bytes_received:
            self.metrics.bytes_received.inc(trace.bytes_received)
        self.metrics.requests.labels(outcome=outcome).inc()
        with self._lock:
            self.outcomes[outcome] += 1
            if outcome == "edge_exit" and isinstance(decided_by, int):
                self.exit_counts[decided_by] = self.exit_counts.get(decided_by, 0) + 1
        if outcome == "edge_exit":
            self.metrics.exits.labels(exit=str(decided_by)).inc()
        log.debug("request id=%s outcome=%s decided_by=%s label=%d conf=%.3f total_ms=%.2f", trace.request_id,
                  outcome, decided_by, label, conf, lat["total"] * 1e3)
        return EdgeResult(request_id=trace.request_id, label=label, class_name=self.class_name(label),
                          confidence=conf, decided_by=decided_by, degraded=degraded, outcome=outcome,
                          latency_ms={k: round(v * 1e3, 4) for k, v in lat.items()},
                          bytes_sent=trace.bytes_sent, bytes_received=trace.bytes_received, energy_j=energy)

    def record_error(self) -> None:
        """Count a request that could not be answered (rejected upload, internal error)."""
        self.metrics.requests.labels(outcome="error").inc()
        with self._lock:
            self.outcomes["error"] += 1

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.outcomes), "exits": {str(b): n for b, n in self.exit_counts.items()}}

    def close(self) -> None:
        """Stop the meter's sampler, if it has one."""
        if self.meter is not None:
            self.meter.close()
