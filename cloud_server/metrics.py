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
        self._series: dict[str, _ModelSeries] = {}  # label -> its resolved children (labels() per call is slow)
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
            registry=r, multiprocess_mode="livesum")
        self.requests = Counter(
            "splitinfer_server_requests", "Inference requests answered, by model and gRPC status code.",
            ["model", "code"], registry=r)
        self.inflight = Gauge(
            "splitinfer_server_inflight_requests", "Inference requests being processed now.", registry=r,
            multiprocess_mode="livesum")
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
        gauge = self.queue_depth.labels(name)

        def report(depth: int) -> None:
            depths[version] = depth
            gauge.set(sum(depths.values()))

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

    def _series_of(self, label: str) -> _ModelSeries:
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = _ModelSeries(self, label)
        return series

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
        series = self._series_of(self.model_label(model))
        series.requests(code).inc()
        series.request_duration.observe(seconds)
        series.request_bytes.inc(request_bytes)
        if response_bytes:
            series.response_bytes.inc(response_bytes)

    def observe_queue(self, model: str, queue_s: float) -> None:
        """Record how long one request waited for its batch."""
        self._series_of(self.model_label(model)).queue_duration.observe(queue_s)

    def observe_batch(self, model: str, samples: int, compute_s: float) -> None:
        """Record one tail run over a batch of ``samples``."""
        series = self._series_of(self.model_label(model))
        series.compute_duration.observe(compute_s)
        series.batch_size.observe(samples)

    def render(self) -> bytes:
        """The exposition text of every family (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Start the ``/metrics`` HTTP endpoint on ``host:port`` (daemon thread)."""
        return serve_registry(self.registry, host, port)


class _ModelSeries:
    """One ``model`` label's children of every family, resolved once."""

    def __init__(self, metrics: ServerMetrics, label: str):
        self.label = label
        self._metrics = metrics
        self.request_duration = metrics.request_duration.labels(label)
        self.queue_duration = metrics.queue_duration.labels(label)
        self.compute_duration = metrics.compute_duration.labels(label)
        self.batch_size = metrics.batch_size.labels(label)
        self.request_bytes = metrics.request_bytes.labels(label)
        self.response_bytes = metrics.response_bytes.labels(label)
        self._requests: dict[str, Counter] = {}

    def requests(self, code: str):
        """The request counter's child for this model and ``code``."""
        child = self._requests.get(code)
        if child is None:
            child = self._requests[code] = self._metrics.requests.labels(self.label, code)
        return child


def serve_registry(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve ``registry`` on ``http://host:port/metrics`` (a daemon thread); logs the bound port."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    log.info("metrics endpoint listening", extra={"fields": {"host": host, "port": bound}})
    return MetricsEndpoint(host=host, port=bound, _server=server, _thread=thread)
