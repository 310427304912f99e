"""The edge request path: head, early exits, offload, fallback (no HTTP here).

One request (``x``: float32 numpy ``[1, C, H, W]``, normalised) goes through:

1. the head (:func:`splitinfer.head.run_head` on the engine's backend), stages ``0 .. split-1``; at every
   boundary ``b <= split`` that carries an exit head, the exit policy scores the exit and, when confident, the
   exit answers (``decided_by = b``, outcome ``edge_exit``);
2. otherwise the split tensor is encoded with the operating point's codec and sent to the cloud server
   (``decided_by = "cloud"``) through the :class:`~edge_agent.offload.Offloader`;
3. when the server fails (unreachable, deadline, bad answer) the request is still answered, degraded: by the
   deepest exit evaluated in the head (its argmax, even below threshold), or, without one, by running the
   remaining stages on the device (``decided_by = num_stages``). Outcome ``fallback``.

A plan with ``split == num_stages`` runs the whole model on the device (``decided_by = num_stages``).

Around it: the engine (:mod:`edge_agent.engine`: torch or ONNX Runtime), the offloader (the client and the
server's health), the link controller (:mod:`edge_agent.link`: estimate, probes, operating-point switches) and
accounting (:mod:`edge_agent.accounting`: metrics and energy from a per-request trace). The operating point is
an immutable snapshot taken at the start of each request; a switch replaces it between requests and never
waits for a request in flight (no lock is held across the network call).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.accounting import LATENCY_KEYS, Accounting, EdgeResult, RequestTrace
from edge_agent.drift import DriftMonitor
from edge_agent.engine import HeadEngine, OnnxEngine, TorchEngine, onnx_engine, torch_engine
from edge_agent.link import LinkController
from edge_agent.metrics import EdgeMetrics
from edge_agent.offload import CloudClientLike, Offloader
from edge_agent.settings import EdgeSettings, parse_address
from splitinfer.energy import DeviceProfile, get_profile
from splitinfer.errors import InvalidInput, Unavailable
from splitinfer.head import ExitPolicy, StageBackend, run_head, top1
from splitinfer.imaging import JPEG_MAGIC, PNG_MAGIC, ImageCodec, denormalise, sniff_format
from splitinfer.plan import IMAGE_CODEC, OperatingPoint
from splitinfer.power import EnergyMeter

log = logging.getLogger("edge_agent.runtime")

EWMA_ALPHA = 0.3
"""Weight of the newest sample in the agent-overhead estimate."""

__all__ = ["LATENCY_KEYS", "CloudClientLike", "EdgeResult", "EdgeRuntime", "OperatingState", "build_runtime"]


class MalformedAnswer(Unavailable):
    """The server answered, but not with usable logits: it counts as down."""


@dataclass(frozen=True)
class OperatingState:
    """One operating point as the request path runs it (replaced whole on a switch)."""

    split: int
    codec_name: str
    codec: Any  # an encoder (encode(h) -> bytes, meta); None at split == num_stages and for the image codec
    exits: tuple[int, ...]
    backend: StageBackend
    drift: DriftMonitor


class EdgeRuntime:
    """Runs requests against a head engine and a cloud client; thread-safe, one worker for the HTTP API.

    ``source`` is a :class:`~edge_agent.engine.HeadEngine` or a loaded :class:`~splitinfer.bundle.Bundle`
    (then ``settings.head_backend`` picks the engine). ``client`` None: no server (edge-only plans)."""

    def __init__(self, source: Any, client: CloudClientLike | None, settings: EdgeSettings,
                 metrics: EdgeMetrics | None = None, profile: DeviceProfile | None = None,
                 clock: Callable[[], float] = time.monotonic, meter: EnergyMeter | None = None) -> None:
        self.engine: HeadEngine = source if isinstance(source, HeadEngine) else torch_engine(source, settings)
        self.plan = self.engine.plan
        self.settings = settings
        self.metrics = metrics if metrics is not None else EdgeMetrics()
        self.profile = profile if profile is not None else get_profile(settings.device)
        self.clock = clock
        self.num_stages = self.engine.num_stages
        self.labels = list(self.plan.input.labels)
        self.policy = ExitPolicy.from_plan(self.plan)
        self.input_shape = [1, *self.plan.input.shape]
        self.accounting = Accounting(self.metrics, self.profile, self.labels, meter)
        self.offloader = Offloader(client, settings.server, settings.recheck_interval_s, settings.timeout_s,
                                   self.metrics, clock)
        self._switch_lock = threading.Lock()
        self._explored: dict[tuple, OperatingState] = {}
        self.op = self._operating_state(self.plan.split, self.plan.codec_at(self.plan.split),
                                        self.plan.active_exits)
        self.links = LinkController(self.plan, settings, self.offloader, self.metrics, self._switch_to,
                                    (self.op.split, self.op.codec_name, self.plan.active_exits), clock)
        self.links.offloading = self.op.split < self.num_stages
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-infer")
        self._lock = threading.Lock()
        self._pending = 0
        self._overhead_ms: float | None = None

    # ------------------------------------------------------------------ views

    @property
    def split(self) -> int:
        return self.op.split

    @property
    def codec_name(self) -> str:
        return self.op.codec_name

    @property
    def codec(self) -> Any:
        return self.op.codec

    @property
    def head_exits(self) -> list[int]:
        return list(self.op.exits)

    @property
    def drift(self) -> DriftMonitor:
        return self.op.drift

    @property
    def link(self):
        """The link estimate (:class:`~edge_agent.linkest.LinkEstimator`)."""
        return self.links.estimator

    @property
    def selector(self):
        return self.links.selector

    @property
    def server_up(self) -> bool | None:
        """True/False after the first offload or probe; None before."""
        return self.offloader.up

    # ------------------------------------------------------------------ operating point

    def set_operating_point(self, split: int, codec: str | None = None, exits: list[int] | None = None) -> None:
        """Switch to another (split, codec, exits) of the bundle between requests (thread-safe).

        ``codec`` defaults to the plan's codec if it applies at ``split``, else uint8-affine; ``exits`` to every
        exit before the split. Raises InvalidInput for a split, codec or exit the bundle cannot run."""
        if not 0 <= split <= self.num_stages:
            raise InvalidInput(f"split {split} outside 0..{self.num_stages}")
        known = {e.boundary for e in self.plan.exits}
        if exits is not None and not set(exits) <= known:
            raise InvalidInput(f"exits {sorted(set(exits) - known)} are not in the bundle (it has {sorted(known)})")
        with self._switch_lock:
            self.op = self._operating_state(split, self.plan.codec_at(split, codec), exits)
            if hasattr(self, "links"):  # (not yet during __init__)
                self.links.offloading = split < self.num_stages

    def _switch_to(self, point: OperatingPoint) -> None:
        self.set_operating_point(point.split, point.codec, list(point.exits))

    def _explored_state(self, point: OperatingPoint) -> OperatingState | None:
        """The operating state of a configuration explored for one request (built once; the operating-point
        gauge keeps showing the one in use). None, logged, when the bundle cannot run it."""
        key = (point.split, point.codec, tuple(point.exits))
        state = self._explored.get(key)
        if state is None:
            try:
                state = self._operating_state(point.split, self.plan.codec_at(point.split, point.codec),
                                              list(point.exits), in_use=False)
            except InvalidInput as exc:
                log.warning("cannot explore split %d (%s): %s", point.split, point.codec, exc)
                return None
            self._explored[key] = state
        return state

    def _operating_state(self, split: int, codec_name: str, exits: list[int] | None,
                         in_use: bool = True) -> OperatingState:
        codec = None
        if split < self.num_stages and codec_name != IMAGE_CODEC:
            codec = self.engine.codec(codec_name, split)
        elif codec_name == IMAGE_CODEC and split != 0:
            raise InvalidInput(f"codec 'image' carries the model input: split must be 0, not {split}")
        head_exits = self.plan.exits_at(split, exits, self.engine.exit_boundaries)
        backend = self.engine.backend(split, head_exits)
        cal = self.plan.exit_calibration
        planned = split == self.plan.split and head_exits == self.plan.planned_exits(self.engine.exit_boundaries)
        reference = self._reference_rates(head_exits)
        rates = {b: reference.get(b, 0.0) for b in head_exits} if cal and planned else {}
        first_is_calibrated = bool(cal and head_exits and head_exits[0] == min(cal.exit_rates, default=-1))
        drift = DriftMonitor(rates, cal.first_exit_conf_edges if cal and first_is_calibrated else [],
                             window=self.settings.drift_window, threshold=self.settings.drift_threshold)
        if in_use:
            self.metrics.set_operating_point(split, codec_name)
        self.accounting.declare_exits(head_exits)
        return OperatingState(split, codec_name, codec, tuple(head_exits), backend, drift)

    def _reference_rates(self, head_exits: list[int]) -> dict[int, float]:
        """Validation exit rates of the exits this plan runs (measured for that subset when the plan has it)."""
        plan = self.plan
        if plan.active_exit_rates is not None and set(plan.active_exit_rates) >= set(head_exits):
            return dict(plan.active_exit_rates)
        return dict(plan.exit_calibration.exit_rates) if plan.exit_calibration else {}

    # ------------------------------------------------------------------ requests

    def submit(self, x: np.ndarray, request_id: str = "", raw: bytes | None = None) -> Future[EdgeResult]:
        """Queue ``infer`` on the single inference worker; Unavailable when too many requests wait."""
        with self._lock:
            if self._pending >= self.settings.max_inflight:
                raise Unavailable(f"edge agent overloaded: {self._pending} requests already waiting")
            self._pending += 1
        try:
            fut = self._executor.submit(self.infer, x, request_id, raw)
        except RuntimeError:
            self._done(None)
            raise Unavailable("edge agent is shutting down") from None
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _fut: Future | None) -> None:
        with self._lock:
            self._pending -= 1

    def infer(self, x: Any, request_id: str = "", raw: bytes | None = None) -> EdgeResult:
        """Answer one request ``x`` (float32 ``[1, C, H, W]``, normalised: a numpy array, or anything numpy
        reads without a copy such as a CPU torch tensor); the policy is in the module docstring.

        ``raw`` is the file ``x`` was decoded from, if any: at the ``image`` operating point (cloud-only, split
        0) a PNG/JPEG upload is forwarded as it came instead of being encoded again."""
        x = self._checked_input(x)
        t0 = time.perf_counter()
        op = self.op  # the operating point of this request, whatever switches meanwhile
        explored = self.links.explore_point() if self.links.learns else None
        if explored is not None:  # a near runner-up measured by this one request (edge_agent/link.py)
            op = self._explored_state(explored) or op
        h = self.engine.prepare(x)  # the input as the backend's tensor (as decoding did before the engines)
        self.links.request_started()
        try:
            res = self._infer(op, x, h, request_id, raw)
        finally:
            self.links.request_finished()
        wall_ms = (time.perf_counter() - t0) * 1e3
        parts = sum(v for k, v in res.latency_ms.items() if k != "total")
        overhead = max(0.0, wall_ms - parts)
        with self._lock:
            self._overhead_ms = overhead if self._overhead_ms is None else \
                self._overhead_ms + EWMA_ALPHA * (overhead - self._overhead_ms)
        if self.links.learns and not res.degraded:  # the online profile: the device's time, the server's
            remote = res.latency_ms.get("transfer", 0.0) + res.latency_ms.get("tail", 0.0) \
                if res.outcome == "cloud" else 0.0
            self.links.observe_request((op.split, op.codec_name, op.exits), wall_ms - remote,
                                       res.latency_ms.get("tail") if res.outcome == "cloud" else None, wall_ms)
        self.links.adapt()
        return res

    def _infer(self, op: OperatingState, x: np.ndarray, h: Any, request_id: str, raw: bytes | None) -> EdgeResult:
        """``x``: the input as numpy; ``h``: the same input as the backend's tensor."""
        trace = self.accounting.begin(request_id)
        trace.ran.add("head")
        with self.engine.session():
            head = run_head(op.backend, self.policy, h, op.split, op.exits)
            trace.latency["head"] = head.head_s
            if head.checks:
                trace.add("exit", head.exit_s)
            self._observe_drift(op, head.first_score, None if head.exit is None else head.exit.boundary)
            if head.exit is not None:
                return self.accounting.finish(trace, head.exit.label, head.exit.confidence, head.exit.boundary,
                                              False, "edge_exit")
            if op.split == self.num_stages:
                conf, label = top1(np.asarray(head.tensor))
                return self.accounting.finish(trace, label, conf, self.num_stages, False, "edge_exit")
            if self.offloader.should_try():
                answer = self._offload(op, trace, head.tensor, x, raw)
                if answer is not None:
                    return answer
            if head.deepest is not None:
                conf, label, decided_by = head.deepest.confidence, head.deepest.label, head.deepest.boundary
            else:
                t = time.perf_counter()
                conf, label = top1(np.asarray(op.backend.run(head.tensor, op.split, self.num_stages)))
                trace.add("tail", time.perf_counter() - t)
                decided_by = self.num_stages
        return self.accounting.finish(trace, label, conf, decided_by, True, "fallback")

    def _offload(self, op: OperatingState, trace: RequestTrace, h: Any, x: np.ndarray,
                 raw: bytes | None) -> EdgeResult | None:
        """Encode and send; the cloud's answer, or None after a failure (recorded in ``trace``)."""
        t = time.perf_counter()
        payload, meta = self._image_payload(x, raw) if op.codec_name == IMAGE_CODEC else op.codec.encode(h)
        trace.add("encode", time.perf_counter() - t)
        trace.ran.add("transfer")
        cpu = time.thread_time()
        t = time.perf_counter()
        try:
            res = self.offloader.send(payload, meta, op.split, op.codec_name, trace.request_id)
            logits = self._checked_logits(res.logits)
        except Exception as exc:  # noqa: BLE001 - any transport failure or bad answer: fall back on the device
            if isinstance(exc, MalformedAnswer):
                self.offloader.failed(exc)
            trace.latency["transfer"] = trace.radio_s = time.perf_counter() - t
            trace.network_cpu_s = time.thread_time() - cpu
            return None
        elapsed = time.perf_counter() - t
        trace.cpu_end = cpu
        sent = int(res.bytes_sent or len(payload))
        received = int(res.bytes_received or 0)
        server_s = (float(res.server_queue_ms) + float(res.server_compute_ms)) / 1e3
        round_trip = float(res.round_trip_s or elapsed)
        network_s = max(round_trip - server_s, 1e-6)
        # The call's wall time splits into the server's tail (queue + decode + compute, as it reports them)
        # and the transfer (network, serialization, the rest), so latency parts still sum to the total.
        server_part = max(0.0, min(server_s, elapsed))
        trace.add("tail", server_part)
        trace.latency["transfer"] = elapsed - server_part
        trace.bytes_sent, trace.bytes_received, trace.radio_s = sent, received, network_s
        self.links.observe_transfer(sent + received, network_s)
        conf, label = top1(logits)
        return self.accounting.finish(trace, label, conf, "cloud", False, "cloud")

    # ------------------------------------------------------------------ helpers

    def _image_payload(self, x: np.ndarray, raw: bytes | None) -> tuple[bytes, dict[str, str]]:
        """The ``image`` codec's payload: the uploaded PNG/JPEG as it came, or ``x`` encoded again (PNG for
        grey inputs, JPEG quality 90 for colour) after undoing the plan's normalisation."""
        if raw is not None and raw[:3] in (PNG_MAGIC[:3], JPEG_MAGIC[:3]):
            return raw, {"format": sniff_format(raw)}
        spec = self.plan.input
        grey = int(spec.shape[0]) == 1
        return ImageCodec(spec, fmt="png" if grey else "jpeg", quality=90).encode(denormalise(x, spec))

    def _observe_drift(self, op: OperatingState, first_score: float | None, exit_boundary: int | None) -> None:
        score, new_alert = op.drift.observe(first_score, exit_boundary)
        self.metrics.drift_score.set(score)
        self.metrics.drift_detected.set(1 if op.drift.drifting else 0)
        if new_alert:
            self.metrics.drift_alerts.inc()

    def _checked_input(self, x: Any) -> np.ndarray:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - whatever it was, it is not an input tensor
            raise InvalidInput(f"input must be a float32 array, got {type(x).__name__}: {exc}") from None
        if arr.dtype == object or arr.ndim == 0:
            raise InvalidInput(f"input must be a float32 array, got {type(x).__name__}")
        if list(arr.shape) != self.input_shape:
            raise InvalidInput(f"input has shape {list(arr.shape)}, the model takes {self.input_shape}")
        if arr.dtype != np.float32:
            raise InvalidInput(f"input has dtype {arr.dtype}, the model takes float32")
        return arr

    def _checked_logits(self, logits: Any) -> np.ndarray:
        arr = np.asarray(logits, dtype=np.float32)
        expected = (1, len(self.labels))
        if arr.shape != expected:
            raise MalformedAnswer(f"cloud server answered logits of shape {list(arr.shape)}, "
                                  f"expected {list(expected)}")
        if not np.isfinite(arr).all():
            raise MalformedAnswer("cloud server answered non-finite logits")
        return arr

    def record_error(self) -> None:
        """Count a request that could not be answered (rejected upload, internal error)."""
        self.accounting.record_error()

    # ------------------------------------------------------------------ server and link

    def probe_server(self) -> bool:
        """Ask the server whether it is ready (health check) and update the up/down state accordingly."""
        return self.offloader.check()

    def needs_probe(self) -> bool:
        """See :meth:`edge_agent.link.LinkController.needs_probe`."""
        return self.links.needs_probe()

    def probe_link(self) -> bool:
        """See :meth:`edge_agent.link.LinkController.probe`."""
        return self.links.probe()

    def adapt(self) -> bool:
        """See :meth:`edge_agent.link.LinkController.adapt`."""
        return self.links.adapt()

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary for ``GET /v1/status``."""
        op = self.op
        with self._lock:
            pending = self._pending
            overhead = None if self._overhead_ms is None else round(self._overhead_ms, 4)
        cal = self.plan.exit_calibration
        return {
            "model": self.plan.model.name,
            "weights_source": self.plan.model.weights_source,
            "bundle": str(self.engine.path),
            "head_backend": self.engine.kind,
            "torch_imported": _torch_imported(),
            "input_shape": list(self.plan.input.shape),
            "num_classes": len(self.labels),
            "num_stages": self.num_stages,
            "split": op.split,
            "codec": op.codec_name,
            "exits": [{"boundary": e.boundary, "score": e.score,
                       "threshold": e.threshold if math.isfinite(e.threshold) else None,
                       "in_head": e.boundary in op.exits}
                      for e in sorted(self.plan.exits, key=lambda e: e.boundary)],
            "exit_calibration": None if cal is None else {
                "mode": cal.mode, "epsilon": cal.epsilon, "delta": cal.delta, "upper_bound": cal.upper_bound,
                "exit_rates": {str(b): r for b, r in cal.exit_rates.items()}},
            "drift": {"score": round(op.drift.score, 4), "detected": op.drift.drifting,
                      "alerts": op.drift.alerts, "window": op.drift.window, "threshold": op.drift.threshold},
            "server": self.offloader.status(),
            "counters": {**self.accounting.counters(), "pending": pending},
            "estimates": {**self.links.estimator.snapshot(), "agent_overhead_ms": overhead},
            "adaptive": self.links.status(),
            "device": {"name": self.profile.name, "description": self.profile.description,
                       "active_watts": self.profile.active_watts, "idle_watts": self.profile.idle_watts,
                       "radio": self.profile.radio.name,
                       "energy_method": "model" if self.accounting.meter is None else
                       f"{self.accounting.meter.method} (compute), model (radio)"},
        }

    def close(self) -> None:
        """Finish queued requests, stop the worker and close the client (and the meter's sampler)."""
        self._executor.shutdown(wait=True)
        self.accounting.close()
        self.offloader.close()


def _torch_imported() -> bool:
    import sys

    return "torch" in sys.modules


def build_runtime(settings: EdgeSettings, metrics: EdgeMetrics | None = None) -> EdgeRuntime:
    """Load the head named by ``settings`` (the bundle in torch, or an exported ONNX head without torch),
    connect the cloud client(s) and build the runtime.

    With torch, also sets torch's (process-wide) intra-op thread count to ``settings.torch_threads``, so the
    CPU time measured per request in the worker thread is all of the request's compute."""
    from edge_agent.replicas import CircuitBreaker, ReplicaSet
    from edge_agent.transport import CloudClient, channel_credentials, read_token
    from splitinfer.allocator import tune_allocator

    tune_allocator()
    if settings.head_backend == "onnx" and settings.onnx_head_dir is not None:
        engine: HeadEngine = onnx_engine(settings.bundle, settings.onnx_head_dir, settings.torch_threads)
    else:
        engine = _torch_bundle_engine(settings)
    profile = get_profile(settings.device)
    credentials = (channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
                   if settings.use_tls else None)
    token = read_token(settings.auth_token_file)
    remote = [a for a in settings.servers if parse_address(a)[0] not in ("127.0.0.1", "localhost", "::1")]
    if token and credentials is None and remote:
        log.warning("a bearer token is configured without TLS: it travels in the clear to %s (set "
                    "SPLITINFER_EDGE_TLS=true or a CA)", ",".join(remote))
    clients = [CloudClient(address, engine.plan.model.name, timeout_s=settings.timeout_s,
                           credentials=credentials, token=token, server_name=settings.tls_server_name,
                           stream=settings.stream)
               for address in settings.servers]
    client = ReplicaSet(clients, timeout_s=settings.timeout_s, backoff_s=settings.retry_backoff_s,
                        breaker=lambda: CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s,
                                                       settings.breaker_max_cooldown_s))
    from splitinfer.power import find_meter

    meter = find_meter(idle_watts=profile.idle_watts) if settings.energy_meter == "auto" else None
    if meter is not None:
        log.info("measuring compute energy with %s", meter.describe())
    runtime = EdgeRuntime(engine, client, settings, metrics=metrics, profile=profile, meter=meter)
    client.on_retry = lambda _address: runtime.metrics.retries.inc()
    client.on_breaker_change = lambda n_open: runtime.metrics.replicas_open.set(n_open)
    return runtime


def _torch_bundle_engine(settings: EdgeSettings) -> HeadEngine:
    """Load the bundle with torch (threads set, a CUDA build noted) and build the engine settings ask for."""
    import torch

    torch.set_num_threads(settings.torch_threads)
    if settings.torch_threads > 1:  # load in a thread that ends: its OpenMP team must not outlive the load
        from splitinfer.omp_teams import call_in_own_thread  # beside the inference worker's (omp_teams.py)

        return call_in_own_thread(_torch_bundle_engine_now, settings, name="load-bundle")
    return _torch_bundle_engine_now(settings)


def _torch_bundle_engine_now(settings: EdgeSettings) -> HeadEngine:
    import torch

    from splitinfer.bundle import load_bundle

    if torch.version.cuda:  # the agent never uses a GPU; CUDA's libraries alone hold ~330 MB of its memory
        log.info("torch %s is a CUDA build (CUDA %s): on a device without a GPU, a CPU-only torch "
                 "(pip install --index-url https://download.pytorch.org/whl/cpu torch) uses ~470 MB less memory, "
                 "and an exported ONNX head (head_backend=onnx, onnx_head_dir) needs no torch at all",
                 torch.__version__, torch.version.cuda)
    return torch_engine(load_bundle(settings.bundle), settings)


# re-exported for callers that name the engines through the runtime module
__all__ += ["OnnxEngine", "TorchEngine"]
