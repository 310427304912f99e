"""Prometheus metrics of the cloud server, in their own registry, served on ``metrics_port``.

Base units (seconds, bytes), ``_total`` counters, histograms, low-cardinality labels: ``model`` is the
served model's name or ``unknown`` for any other name a client sends, ``code`` a gRPC status name.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from splitinfer import wire

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNKNOWN_MODEL = "unknown"


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP server (a WSGI server on a daemon thread)."""

    host: str
    port: int
    _server: object
    _thread: threading.Thread

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]


class ServerMetrics:
    """The server's metric families (see the module docstring for label conventions)."""

    def __init__(self, model_names: str | list[str] = (), registry: CollectorRegistry | None = None):
        self.models: set[str] = set()
        self._version_depths: dict[str, dict[str, int]] = {}  # model -> version -> requests queued
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "splitinfer_server_request_duration_seconds", "Time to answer one inference request (ModelInfer "
            "call or stream message), from receipt to response.", ["model"], buckets=LATENCY_BUCKETS,
            registry=r)
        self.queue_duration = Histogram(
            "splitinfer_server_queue_duration_seconds", "Time a request waited in the batch queue before its "
            "batch started.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_duration = Histogram(
            "splitinfer_server_compute_duration_seconds", "Time to decode the features and run the tail "
            "(or the full model) for one batch.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "splitinfer_server_batch_size", "Samples per tail run (one run serves a whole batch).", ["model"],
            buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "splitinfer_server_queue_depth", "Requests waiting in the batch queues now (all versions).", ["model"],
            registry=r)
        self.requests = Counter(
            "splitinfer_server_requests", "Inference requests answered, by model and gRPC status code.",
            ["model", "code"], registry=r)
        self.inflight = Gauge(
            "splitinfer_server_inflight_requests", "Inference requests being processed now.", registry=r)
        self.request_bytes = Counter(
            "splitinfer_server_request_bytes", "Serialized size of received inference requests, in bytes.",
            ["model"], registry=r)
        self.response_bytes = Counter(
            "splitinfer_server_response_bytes", "Serialized size of sent inference responses, in bytes.",
            ["model"], registry=r)
        self.link_probes = Counter(
            "splitinfer_server_link_probes", "Link probes answered (edge agents and `plan probe` timing the "
            "transfer of a message to the probe model), by gRPC status code; not inference requests.",
            ["code"], registry=r)
        self.link_probe_bytes = Counter(
            "splitinfer_server_link_probe_bytes", "Serialized size of received link probes, in bytes.",
            registry=r)
        for name in [model_names] if isinstance(model_names, str) else model_names:
            self.add_model(name)

    def queue_depth_reporter(self, name: str, version: str) -> Callable[[int], None]:
        """A callback for one version's batcher: the ``model`` gauge shows the sum over the model's versions."""
        depths = self._version_depths.setdefault(name, {})

        def report(depth: int) -> None:
            depths[version] = depth
            self.queue_depth.labels(name).set(sum(depths.values()))

        return report

    def add_model(self, name: str) -> None:
        """Start labelling ``name`` by name, with every family visible from the next scrape."""
        if name in self.models:
            return
        self.models.add(name)
        for fam in (self.request_duration, self.queue_duration, self.compute_duration, self.batch_size,
                    self.queue_depth, self.request_bytes, self.response_bytes):
            fam.labels(name)
        self.requests.labels(name, "OK")

    def model_label(self, name: str) -> str:
        """``name`` when it is a served model, else ``unknown`` (keeps label cardinality bounded)."""
        return name if name in self.models else UNKNOWN_MODEL

    def observe_request(self, model: str, code: str, seconds: float, request_bytes: int,
                        response_bytes: int) -> None:
        """Record one answered request (``code`` is the gRPC status name, e.g. ``OK``); a link probe is
        counted apart (``splitinfer_server_link_probes_total``), so probes never look like failed inferences."""
        if model == wire.PROBE_MODEL:
            self.link_probes.labels(code).inc()
            self.link_probe_bytes.inc(request_bytes)
            return
        label = self.model_label(model)
        self.requests.labels(label, code).inc()
        self.request_duration.labels(label).observe(seconds)
        self.request_bytes.labels(label).inc(request_bytes)
        if response_bytes:
            self.response_bytes.labels(label).inc(response_bytes)

    def observe_queue(self, model: str, queue_s: float) -> None:
        """Record how long one request waited for its batch."""
        self.queue_duration.labels(self.model_label(model)).observe(queue_s)

    def observe_batch(self, model: str, samples: int, compute_s: float) -> None:
        """Record one tail run over a batch of ``samples``."""
        label = self.model_label(model)
        self.compute_duration.labels(label).observe(compute_s)
        self.batch_size.labels(label).observe(samples)

    def render(self) -> bytes:
        """The exposition text of every family (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Start the ``/metrics`` HTTP endpoint on ``host:port`` (daemon thread)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        bound = server.server_address[1]
        log.info("metrics endpoint listening", extra={"fields": {"host": host, "port": bound}})
        return MetricsEndpoint(host=host, port=bound, _server=server, _thread=thread)
