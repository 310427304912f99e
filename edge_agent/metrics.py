"""Prometheus metrics of the edge agent, in their own registry (base units, ``_total`` counters).

==========================================================  =========  ===================================
name                                                        type       labels
==========================================================  =========  ===================================
``splitinfer_edge_request_duration_seconds``                histogram  ``stage``: head, exit, encode,
                                                                       transfer, tail, total
``splitinfer_edge_exits_total``                             counter    ``exit``: boundary index
``splitinfer_edge_requests_total``                          counter    ``outcome``: edge_exit, cloud,
                                                                       fallback, error
``splitinfer_edge_bytes_sent_total``                        counter
``splitinfer_edge_bytes_received_total``                    counter
``splitinfer_edge_bandwidth_bytes_per_second``              gauge      (smoothed estimate)
``splitinfer_edge_rtt_seconds``                             gauge      (smoothed estimate)
``splitinfer_edge_operating_point``                         gauge      ``split``, ``codec`` (1 = current)
``splitinfer_edge_operating_point_switches_total``          counter    (adaptive switches)
``splitinfer_edge_explorations_total``                      counter    (requests run on a near runner-up)
``splitinfer_edge_link_changes_total``                      counter    (step changes of the link estimate)
``splitinfer_edge_energy_joules_total``                     counter    ``component``: compute, radio;
                                                                       ``method``: model
``splitinfer_edge_server_up``                               gauge      (1 reachable, 0 not)
==========================================================  =========  ===================================

The bandwidth gauge is in bytes per second (not bits): ``promtool check metrics`` insists on base units.
An exit label equal to the number of stages counts plans whose split is the output (whole model on the
device). A stage is observed only when it ran: ``exit`` when at least one exit head was evaluated,
``encode``, ``transfer`` and ``tail`` when the request was offloaded (``tail`` is then the server's reported
queue + compute time, and ``transfer`` the rest of the call), ``tail`` also when the device ran the tail in a
degraded fallback. ``total`` covers the whole request in the worker. Degraded answers (server down) count
in ``requests_total{outcome="fallback"}``, not in ``exits_total``, which counts confident exits only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

STAGES = ("head", "exit", "encode", "transfer", "tail", "total")
OUTCOMES = ("edge_exit", "cloud", "fallback", "error")
ENERGY_COMPONENTS = ("compute", "radio")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The classic text format (0.0.4), understood by every Prometheus version."""


class EdgeMetrics:
    """The edge agent's metric families, registered in a private :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.duration = Histogram("splitinfer_edge_request_duration_seconds",
                                  "Time spent per request in each stage on the edge.", ["stage"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.exits = Counter("splitinfer_edge_exits_total",
                             "Requests answered by a confident early exit, by boundary index.", ["exit"],
                             registry=r)
        self.requests = Counter("splitinfer_edge_requests_total",
                                "Requests by outcome: answered by an exit on the device, by the cloud, "
                                "degraded on the device (fallback), or failed (error).", ["outcome"],
                                registry=r)
        self.bytes_sent = Counter("splitinfer_edge_bytes_sent_total", "Bytes sent to the cloud server.",
                                  registry=r)
        self.bytes_received = Counter("splitinfer_edge_bytes_received_total",
                                      "Bytes received from the cloud server.", registry=r)
        self.bandwidth = Gauge("splitinfer_edge_bandwidth_bytes_per_second",
                               "Smoothed estimate of the link throughput from real offloads and probes "
                               "(bytes moved / (network time - RTT)).", registry=r)
        self.rtt = Gauge("splitinfer_edge_rtt_seconds",
                         "Smoothed estimate of the network round trip (round trip minus server queue and "
                         "compute time).", registry=r)
        self.operating_point = Gauge("splitinfer_edge_operating_point",
                                     "The operating point in use (value 1), by split boundary and codec.",
                                     ["split", "codec"], registry=r)
        self.switches = Counter("splitinfer_edge_operating_point_switches_total",
                                "Operating-point switches made by the adaptive controller.", registry=r)
        self.explorations = Counter("splitinfer_edge_explorations_total",
                                    "Requests run on a near runner-up configuration to measure it (rule predicted).",
                                    registry=r)
        self.link_changes = Counter("splitinfer_edge_link_changes_total",
                                    "Step changes detected in the link estimate (bandwidth or RTT).", registry=r)
        self.energy = Counter("splitinfer_edge_energy_joules_total",
                              "Energy spent on the device by component; method says how it was obtained "
                              "(model = estimated from CPU time and bytes with the device profile).",
                              ["component", "method"], registry=r)
        self.drift_score = Gauge("splitinfer_edge_drift_score",
                                 "Total-variation distance of live exit behaviour from calibration (0..1).",
                                 registry=r)
        self.drift_detected = Gauge("splitinfer_edge_drift_detected",
                                    "1 while the drift score exceeds its threshold (exit guarantee at risk).",
                                    registry=r)
        self.drift_alerts = Counter("splitinfer_edge_drift_alerts_total",
                                    "Times input drift was newly detected.", registry=r)
        self.server_up = Gauge("splitinfer_edge_server_up",
                               "1 when the cloud server answered the last offload or probe, 0 otherwise.",
                               registry=r)
        self.retries = Counter("splitinfer_edge_retries_total",
                               "Offloads retried on another server replica after an availability error.",
                               registry=r)
        self.replicas_open = Gauge("splitinfer_edge_replicas_open",
                                   "Server replicas whose circuit breaker is open (no calls go to them).",
                                   registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        for component in ENERGY_COMPONENTS:
            self.energy.labels(component=component, method="model")

    def set_operating_point(self, split: int, codec: str) -> None:
        """Mark ``(split, codec)`` as the current operating point (and any previous one as 0)."""
        for labels in list(self._operating_point_labels()):
            self.operating_point.labels(*labels).set(0)
        self.operating_point.labels(split=str(split), codec=codec).set(1)

    def _operating_point_labels(self) -> list[tuple[str, ...]]:
        return [tuple(s.labels[k] for k in ("split", "codec"))
                for m in self.operating_point.collect() for s in m.samples]

    def declare_exits(self, boundaries: list[int]) -> None:
        """Create the exit counters at 0 so every exit shows up before it first fires."""
        for b in boundaries:
            self.exits.labels(exit=str(b))

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
