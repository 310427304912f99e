"""The edge data plane: head, early exits, offload policy, fallback and energy accounting (no HTTP here).

One request (``x``: ``[1, C, H, W]``, normalised) goes through:

1. the head, stages ``0 .. split-1``, under ``torch.inference_mode``; at every boundary ``b <= split`` that
   carries an exit head, the exit's max softmax is compared with its threshold and, when confident, the
   exit answers (``decided_by = b``, outcome ``edge_exit``);
2. otherwise the split tensor is encoded with the plan's codec and sent to the cloud server
   (``decided_by = "cloud"``);
3. when the server fails (unreachable, deadline, bad answer) the request is still answered, degraded: by the
   deepest exit evaluated in the head (its argmax, even below threshold), or, without one, by running the
   remaining stages on the device (``decided_by = num_stages``). Outcome ``fallback``.

After a failure the server is considered down: requests are answered on the device without trying it until
``recheck_interval_s`` has passed; then one request tries again and a success marks the server up again.
A plan with ``split == num_stages`` runs the whole model on the device (``decided_by = num_stages``).

Energy (``method="model"``): compute = CPU time of the request's own work (``time.thread_time`` deltas in
the calling thread; torch runs ``torch_threads`` intra-op threads, 1 by default, so the figure is exact) times
the profile's active-minus-idle watts; radio = bytes sent and the network time of the offload (round trip
minus the server's queue and compute time; the elapsed time for a failed attempt) through the radio model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from edge_agent.adapt import OperatingPointSelector
from edge_agent.drift import DriftMonitor
from edge_agent.linkest import LinkEstimator
from edge_agent.metrics import OUTCOMES, EdgeMetrics
from edge_agent.settings import EdgeSettings, parse_address
from splitinfer.allocator import tune_allocator
from splitinfer.bundle import Bundle, load_bundle
from splitinfer.calibration import confidence
from splitinfer.energy import DeviceProfile, get_profile
from splitinfer.errors import InvalidInput, NotFound, Unavailable
from splitinfer.imaging import JPEG_MAGIC, PNG_MAGIC, ImageCodec, sniff_format
from splitinfer.power import RaplMeter, find_meter

log = logging.getLogger("edge_agent.runtime")

EWMA_ALPHA = 0.3
PROBE_ANSWER_BYTES = 64  # the probe's small answer (an empty OK response, or another server's NOT_FOUND), roughly
"""Weight of the newest sample in the bandwidth and RTT estimates."""

LATENCY_KEYS = ("head", "exit", "encode", "transfer", "tail", "total")


class CloudClientLike(Protocol):
    """What the runtime needs from :class:`edge_agent.transport.CloudClient`."""

    def infer_features(self, payload: bytes, meta: dict, split: int, codec: str,
                       request_id: str = "") -> Any: ...

    def check_ready(self) -> None: ...

    def close(self) -> None: ...


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


class EdgeRuntime:
    """Runs requests against a loaded bundle and a cloud client; thread-safe, one worker for the HTTP API."""

    def __init__(self, bundle: Bundle, client: CloudClientLike, settings: EdgeSettings,
                 metrics: EdgeMetrics | None = None, profile: DeviceProfile | None = None,
                 clock: Callable[[], float] = time.monotonic, meter: RaplMeter | None = None) -> None:
        self.bundle = bundle
        self.plan = bundle.plan
        self.client = client
        self.settings = settings
        self.metrics = metrics if metrics is not None else EdgeMetrics()
        self.profile = profile if profile is not None else get_profile(settings.device)
        self.clock = clock
        self.meter = meter  # a measured energy source (RAPL or INA3221), or None: the power model
        self._energy_start: list[int] | None = None
        self.num_stages = bundle.staged.num_stages
        self.labels = list(self.plan.input.labels)
        self.exit_scores = {e.boundary: e.score for e in self.plan.exits}
        self._op_lock = threading.Lock()
        self._exit_counts: dict[int, int] = {}
        self._onnx = None  # an ONNX Runtime head (head_backend=onnx), or None: torch
        self.exit_heads = bundle.exits
        if settings.head_backend == "onnx":
            self._onnx = load_onnx_head(bundle, settings)
            self.exit_heads = self._onnx.exits
        self._apply_operating_point(self.plan.split, self.plan.codec.name, self.plan.active_exits)
        self.input_shape = [1, *self.plan.input.shape]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-infer")
        self._lock = threading.Lock()
        self._pending = 0
        self._server_up: bool | None = None
        self._retry_at = 0.0
        self._last_error = ""
        self._overhead_ms: float | None = None
        self.link = LinkEstimator(clock=clock)
        self._link_changes_seen = 0
        self._last_probe = clock()
        self._serving = 0  # requests inside infer() now
        self._last_served = -math.inf  # clock() when the last one finished
        self.selector: OperatingPointSelector | None = None
        self._adapted_for: tuple[float | None, float | None] | None = None
        if settings.adaptive and self.plan.operating_points:
            self.selector = OperatingPointSelector(self.plan.operating_points, settings.adapt_margin,
                                                   settings.adapt_min_dwell_s, clock)
            current = [p for p in self.plan.operating_points if p.split == self.split
                       and p.codec == self.codec_name and (self.plan.active_exits is None
                                                           or sorted(p.exits) == sorted(self.plan.active_exits))]
            if current:  # the cell of the planned link (plan.notes), not merely the first with this config
                bw, rtt_ms = self.plan.notes.get("bandwidth_bps"), self.plan.notes.get("rtt_ms")
                if isinstance(bw, int | float) and isinstance(rtt_ms, int | float) and bw > 0:
                    current.sort(key=lambda p: self.selector.distance(p, float(bw), float(rtt_ms) / 1e3))
                self.selector.start_at(current[0])
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self.metrics.server_up.set(0)

    # ------------------------------------------------------------------ operating point

    def set_operating_point(self, split: int, codec: str | None = None, exits: list[int] | None = None) -> None:
        """Switch to another (split, codec, exits) of the bundle between requests (thread-safe).

        ``codec`` defaults to the plan's codec if it applies at ``split``, else uint8-affine; ``exits`` to every
        exit before the split. Raises InvalidInput for a split, codec or exit the bundle cannot run.
        """
        if not 0 <= split <= self.num_stages:
            raise InvalidInput(f"split {split} outside 0..{self.num_stages}")
        if codec is None:
            codec = self.plan.codec.name
            try:
                self.bundle.codec_for(codec, split)
            except Exception:
                codec = "uint8-affine"
        known = {e.boundary for e in self.plan.exits}
        if exits is not None and not set(exits) <= known:
            raise InvalidInput(f"exits {sorted(set(exits) - known)} are not in the bundle (it has {sorted(known)})")
        with self._op_lock:
            self._apply_operating_point(split, codec, exits)

    def _apply_operating_point(self, split: int, codec_name: str, exits: list[int] | None) -> None:
        try:
            codec = self.bundle.codec_for(codec_name, split) if split < self.num_stages else None
        except Exception as exc:
            raise InvalidInput(f"codec {codec_name!r} cannot be used at split {split}: {exc}") from exc
        certified = {e.boundary: e.threshold for e in self.plan.exits}
        enabled = sorted(certified) if exits is None else sorted(exits)
        head_exits = [b for b in enabled if 0 < b <= split and b in self.bundle.exits]
        # an int8 head is quantized for the planned split; elsewhere the float32 stages run
        head = self.bundle.edge_head() if split == self.plan.split else self.bundle.staged
        if self._onnx is not None:
            if not self._onnx.head.supports(split, head_exits):
                raise InvalidInput(f"the ONNX head was not exported for split {split} with exits {head_exits}")
            head = self._onnx
        self.split, self.codec_name, self.codec = split, codec_name, codec
        self.thresholds = {b: certified[b] for b in head_exits}
        self.head_exits = head_exits
        self.head = head
        for b in head_exits:  # counts survive switches
            self._exit_counts.setdefault(b, 0)
        cal = self.plan.exit_calibration
        planned = head_exits == sorted(b for b in self.bundle.thresholds() if b <= self.plan.split) \
            and split == self.plan.split
        rates = ({b: self._reference_rates().get(b, 0.0) for b in head_exits} if cal and planned else {})
        first_is_calibrated = bool(cal and head_exits and head_exits[0] == min(cal.exit_rates, default=-1))
        self.drift = DriftMonitor(rates, cal.first_exit_conf_edges if cal and first_is_calibrated else [],
                                  window=self.settings.drift_window, threshold=self.settings.drift_threshold)
        self.metrics.set_operating_point(split, codec_name)
        self.metrics.declare_exits(head_exits)

    # ------------------------------------------------------------------ requests

    def submit(self, x: torch.Tensor, request_id: str = "", raw: bytes | None = None) -> Future[EdgeResult]:
        """Queue ``infer`` on the single inference worker; Unavailable when too many requests wait."""
        with self._lock:
            if self._pending >= self.settings.max_pending:
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

    def infer(self, x: torch.Tensor, request_id: str = "", raw: bytes | None = None) -> EdgeResult:
        """Answer one request ``x`` (``[1, C, H, W]``, normalised); the policy is in the module docstring.

        ``raw`` is the file ``x`` was decoded from, if any: at the ``image`` operating point (cloud-only, split
        0) a PNG/JPEG upload is forwarded as it came instead of being encoded again."""
        self._check_input(x)
        t0 = time.perf_counter()
        with self._lock:
            self._serving += 1
        try:
            with self._op_lock:  # the operating point does not change under a request
                res = self._infer(x, request_id, raw)
        finally:
            with self._lock:
                self._serving -= 1
                self._last_served = self.clock()
        parts = sum(v for k, v in res.latency_ms.items() if k != "total")
        overhead = max(0.0, (time.perf_counter() - t0) * 1e3 - parts)
        with self._lock:
            self._overhead_ms = overhead if self._overhead_ms is None else \
                self._overhead_ms + EWMA_ALPHA * (overhead - self._overhead_ms)
        self.adapt()
        return res

    # ------------------------------------------------------------------ adaptation

    def adapt(self) -> bool:
        """Switch operating point if the link estimate calls for it (logged and counted); True if switched."""
        if self.selector is None:
            return False
        estimate = (self.link.bandwidth_bps, self.link.rtt_s)
        if estimate == self._adapted_for:  # nothing new (e.g. edge-only between probes): skip the grid search
            return False
        decision = self.selector.update(*estimate)
        sel = self.selector
        dwelling = sel.last_switch is not None and sel.clock() - sel.last_switch < sel.min_dwell_s
        self._adapted_for = None if dwelling else estimate  # a switch held back by dwell is retried later
        if decision is None:
            return False
        p = decision.point
        try:
            self.set_operating_point(p.split, p.codec, list(p.exits))
        except InvalidInput as exc:  # a table entry this bundle cannot run: keep the current point
            log.warning("cannot switch to split %d (%s): %s", p.split, p.codec, exc)
            return False
        self.metrics.switches.inc()
        log.info("operating point -> split %d, codec %s, exits %s (%s)", p.split, p.codec, list(p.exits),
                 decision.reason)
        return True

    def needs_probe(self) -> bool:
        """True when the link (its RTT in particular: large offloads do not measure it) has not been probed
        for ``probe_interval_s`` and the agent is idle (no request for ``probe_idle_s``), or when the last probe
        is older than ``probe_max_interval_s`` (continuous load)."""
        s = self.settings
        with self._lock:
            now = self.clock()
            age = now - self._last_probe
            if age < s.probe_interval_s:
                return False
            if age >= s.probe_max_interval_s:
                return True
            return self._serving == 0 and now - self._last_served >= s.probe_idle_s

    def probe_link(self) -> bool:
        """Active probes: the RTT (ServerReady) and, when no offload measured the bandwidth for
        ``probe_interval_s`` (idle, or running edge-only), the throughput (a ``probe_bytes`` message). Feeds the
        estimator and may switch the operating point. False when the server could not be reached."""
        probe_rtt = getattr(self.client, "probe_rtt", None)
        probe_transfer = getattr(self.client, "probe_transfer", None)
        if probe_rtt is None or probe_transfer is None:
            return False
        last_bw = self.link.last_bandwidth_sample
        idle = last_bw is None or self.clock() - last_bw >= self.settings.probe_interval_s
        try:
            self.link.observe_rtt(probe_rtt())
            measured = probe_transfer(self.settings.probe_bytes) if idle else None
        except Exception as exc:  # a failed probe marks the server down like a failed offload
            self._mark_down(exc)
            return False
        self._mark_up()
        if measured is not None:  # request bytes + the small answer
            self.link.observe_transfer(measured[0] + PROBE_ANSWER_BYTES, measured[1])
        self._publish_link()
        with self._lock:
            self._last_probe = self.clock()
        self.adapt()
        return True

    def _publish_link(self) -> None:
        """Copy the link estimate to the gauges; count and log newly detected step changes."""
        snap = self.link.snapshot()
        if snap["bandwidth_bps"]:
            self.metrics.bandwidth.set(float(snap["bandwidth_bps"]) / 8.0)  # the gauge is in bytes/s
        if snap["rtt_s"] is not None:
            self.metrics.rtt.set(float(snap["rtt_s"]))
        new = int(snap["changes"] or 0) - self._link_changes_seen
        if new > 0:
            self._link_changes_seen += new
            self.metrics.link_changes.inc(new)
            bw = "not measured yet" if not snap["bandwidth_bps"] else f"{snap['bandwidth_bps'] / 1e6:.3g} Mbit/s"
            rtt = "not measured yet" if snap["rtt_s"] is None else f"{snap['rtt_s'] * 1e3:.3g} ms"
            log.info("link change detected: bandwidth %s, RTT %s", bw, rtt)

    def _infer(self, x: torch.Tensor, request_id: str, raw: bytes | None = None) -> EdgeResult:
        self._energy_start = None
        if self.meter is not None:
            try:
                self._energy_start = self.meter.read_uj()
            except (OSError, ValueError):  # a failed sensor read costs the measurement, not the request
                log.debug("energy meter read failed; this request's compute energy is modelled", exc_info=True)
        t_start = time.perf_counter()
        cpu_start = time.thread_time()
        lat = dict.fromkeys(LATENCY_KEYS, 0.0)
        ran: set[str] = {"head"}
        staged = self.bundle.staged  # the on-device tail (degraded answers) always runs in torch
        deepest: tuple[int, float, int] | None = None
        first_score: float | None = None
        with torch.inference_mode():
            h = x
            prev = 0
            for b in self.head_exits:
                t = time.perf_counter()
                h = self._finite(self.head.run(h, prev, b), b)
                lat["head"] += time.perf_counter() - t
                prev = b
                t = time.perf_counter()
                logits = self.exit_heads[b](h)
                conf, label = self._top1(logits)
                score = float(confidence(logits, self.exit_scores.get(b, "max_softmax"))[0][0])
                lat["exit"] += time.perf_counter() - t
                ran.add("exit")
                deepest = (b, conf, label)
                if first_score is None:
                    first_score = score
                if score >= self.thresholds[b]:
                    self._observe_drift(first_score, b)
                    return self._finish(request_id, label, conf, b, False, "edge_exit", lat, ran, t_start,
                                        time.thread_time() - cpu_start)
            self._observe_drift(first_score, None)
            t = time.perf_counter()
            h = self._finite(self.head.run(h, prev, self.split), self.split)
            lat["head"] += time.perf_counter() - t
            if self.split == self.num_stages:
                conf, label = self._top1(h)
                return self._finish(request_id, label, conf, self.num_stages, False, "edge_exit", lat, ran,
                                    t_start, time.thread_time() - cpu_start)

            transfer_s = 0.0
            transfer_cpu_s = 0.0
            if self._should_offload():
                t = time.perf_counter()
                payload, meta = self._image_payload(x, raw) if self.codec_name == "image" else self.codec.encode(h)
                lat["encode"] = time.perf_counter() - t
                ran.update(("encode", "transfer"))
                cpu_s = time.thread_time() - cpu_start
                t = time.perf_counter()
                try:
                    res = self.client.infer_features(payload, dict(meta), self.split, self.codec_name,
                                                     request_id)
                    logits = self._check_logits(res.logits)
                except Exception as exc:  # any transport failure or bad answer: fall back on the device
                    transfer_s = time.perf_counter() - t
                    transfer_cpu_s = time.thread_time() - cpu_start - cpu_s
                    lat["transfer"] = transfer_s
                    if isinstance(exc, InvalidInput | NotFound):
                        # the server refused this request (or this model); it is not down
                        log.warning("cloud server refused request %s: %s; answering on the device", request_id, exc)
                    else:
                        self._mark_down(exc)
                else:
                    lat["transfer"] = time.perf_counter() - t
                    self._mark_up()
                    return self._finish_cloud(request_id, logits, res, len(payload), lat, ran, t_start, cpu_s)
            if deepest is not None:
                b, conf, label = deepest
                decided_by: int = b
            else:
                t = time.perf_counter()
                conf, label = self._top1(staged.run(h, self.split, self.num_stages))
                lat["tail"] = time.perf_counter() - t
                ran.add("tail")
                decided_by = self.num_stages
            cpu_s = time.thread_time() - cpu_start - transfer_cpu_s  # head/exit/encode (+ local tail) work
            return self._finish(request_id, label, conf, decided_by, True, "fallback", lat, ran, t_start,
                                cpu_s, radio_seconds=transfer_s)

    # ------------------------------------------------------------------ helpers

    def _image_payload(self, x: torch.Tensor, raw: bytes | None) -> tuple[bytes, dict[str, str]]:
        """The ``image`` codec's payload: the uploaded PNG/JPEG as it came, or ``x`` encoded again (PNG for
        grey inputs, JPEG quality 90 for colour) after undoing the plan's normalisation."""
        if raw is not None and raw[:3] in (PNG_MAGIC[:3], JPEG_MAGIC[:3]):
            return raw, {"format": sniff_format(raw)}
        spec = self.plan.input
        c = int(spec.shape[0])
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        pixels = ((x[0] * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
        arr = pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).contiguous().numpy()
        return ImageCodec(spec, fmt="png" if c == 1 else "jpeg", quality=90).encode(arr)

    def _reference_rates(self) -> dict[int, float]:
        """Validation exit rates of the exits this plan runs (measured for that subset when the plan has it)."""
        plan = self.plan
        if plan.active_exit_rates is not None and set(plan.active_exit_rates) >= set(self.head_exits):
            return dict(plan.active_exit_rates)
        return dict(plan.exit_calibration.exit_rates) if plan.exit_calibration else {}

    @staticmethod
    def _finite(h: torch.Tensor, boundary: int) -> torch.Tensor:
        if not bool(torch.isfinite(h).all()):
            raise InvalidInput(f"the input drives the model to non-finite values at boundary {boundary}; "
                               "is it normalised like the plan's input spec?")
        return h

    def _observe_drift(self, first_score: float | None, exit_boundary: int | None) -> None:
        score, new_alert = self.drift.observe(first_score, exit_boundary)
        self.metrics.drift_score.set(score)
        self.metrics.drift_detected.set(1 if self.drift.drifting else 0)
        if new_alert:
            self.metrics.drift_alerts.inc()

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InvalidInput(f"input must be a torch.Tensor, got {type(x).__name__}")
        if list(x.shape) != self.input_shape:
            raise InvalidInput(f"input has shape {list(x.shape)}, the model takes {self.input_shape}")
        if x.dtype != torch.float32:
            raise InvalidInput(f"input has dtype {x.dtype}, the model takes float32")

    def _top1(self, logits: torch.Tensor) -> tuple[float, int]:
        probs = F.softmax(logits.float(), dim=1)
        conf, label = probs.max(dim=1)
        return float(conf[0]), int(label[0])

    def _check_logits(self, logits: Any) -> torch.Tensor:
        arr = np.asarray(logits, dtype=np.float32)
        expected = (1, len(self.labels))
        if arr.shape != expected:
            raise Unavailable(f"cloud server answered logits of shape {list(arr.shape)}, "
                              f"expected {list(expected)}")
        if not np.isfinite(arr).all():
            raise Unavailable("cloud server answered non-finite logits")
        return torch.from_numpy(arr.copy())

    def _class_name(self, label: int) -> str:
        return self.labels[label] if 0 <= label < len(self.labels) else str(label)

    def _finish_cloud(self, request_id: str, logits: torch.Tensor, res: Any, payload_bytes: int,
                      lat: dict[str, float], ran: set[str], t_start: float, cpu_s: float) -> EdgeResult:
        sent = int(getattr(res, "bytes_sent", 0) or payload_bytes)
        received = int(getattr(res, "bytes_received", 0) or 0)
        server_s = (float(getattr(res, "server_queue_ms", 0.0))
                    + float(getattr(res, "server_compute_ms", 0.0))) / 1e3
        round_trip = float(getattr(res, "round_trip_s", 0.0) or lat["transfer"])
        network_s = max(round_trip - server_s, 1e-6)
        # The call's wall time splits into the server's tail (queue + decode + compute, as it reports them)
        # and the transfer (network, serialization, the rest), so latency parts still sum to the total.
        server_part = max(0.0, min(server_s, lat["transfer"]))
        lat["tail"] = server_part
        lat["transfer"] -= server_part
        ran.add("tail")
        self.link.observe_transfer(sent + received, network_s)
        self._publish_link()
        self.metrics.bytes_sent.inc(sent)
        self.metrics.bytes_received.inc(received)
        conf, label = self._top1(logits)
        return self._finish(request_id, label, conf, "cloud", False, "cloud", lat, ran, t_start, cpu_s,
                            bytes_sent=sent, bytes_received=received, radio_seconds=network_s)

    def _finish(self, request_id: str, label: int, conf: float, decided_by: int | str, degraded: bool,
                outcome: str, lat: dict[str, float], ran: set[str], t_start: float, cpu_s: float,
                bytes_sent: int = 0, bytes_received: int = 0, radio_seconds: float = 0.0) -> EdgeResult:
        lat["total"] = time.perf_counter() - t_start
        ran.add("total")
        for stage in LATENCY_KEYS:
            if stage in ran:
                self.metrics.duration.labels(stage=stage).observe(lat[stage])
        energy = {"compute": self.profile.compute_joules(cpu_s),
                  "radio": self.profile.radio_joules(bytes_sent, radio_seconds) if "transfer" in ran else 0.0}
        methods = {"compute": "model", "radio": "model"}
        if self.meter is not None and self._energy_start is not None:
            try:  # measured package energy over the request (the radio stays modelled: RAPL cannot see it)
                energy["compute"] = self.meter.joules_between(self._energy_start, self.meter.read_uj())
                methods["compute"] = self.meter.method
            except (OSError, ValueError):
                log.warning("energy meter unreadable; using the power model", exc_info=True)
        for component, joules in energy.items():
            self.metrics.energy.labels(component=component, method=methods[component]).inc(joules)
        self.metrics.requests.labels(outcome=outcome).inc()
        with self._lock:
            self._outcomes[outcome] += 1
            if outcome == "edge_exit" and isinstance(decided_by, int):
                self._exit_counts[decided_by] = self._exit_counts.get(decided_by, 0) + 1
        if outcome == "edge_exit":
            self.metrics.exits.labels(exit=str(decided_by)).inc()
        log.debug("request id=%s outcome=%s decided_by=%s label=%d conf=%.3f total_ms=%.2f", request_id,
                  outcome, decided_by, label, conf, lat["total"] * 1e3)
        return EdgeResult(request_id=request_id, label=label, class_name=self._class_name(label),
                          confidence=conf, decided_by=decided_by, degraded=degraded, outcome=outcome,
                          latency_ms={k: round(v * 1e3, 4) for k, v in lat.items()}, bytes_sent=bytes_sent,
                          bytes_received=bytes_received, energy_j=energy)

    def record_error(self) -> None:
        """Count a request that could not be answered (rejected upload, internal error)."""
        self.metrics.requests.labels(outcome="error").inc()
        with self._lock:
            self._outcomes["error"] += 1

    # ------------------------------------------------------------------ server state

    def _should_offload(self) -> bool:
        with self._lock:
            if self._server_up is not False:
                return True
            now = self.clock()
            if now >= self._retry_at:
                self._retry_at = now + self.settings.recheck_interval_s  # one attempt per interval
                return True
            return False

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            was_up = self._server_up
            self._server_up = False
            self._retry_at = self.clock() + self.settings.recheck_interval_s
            self._last_error = str(exc) if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {exc}"
        self.metrics.server_up.set(0)
        if was_up is not False:
            log.warning("cloud server %s unavailable (%s); answering on the device, retry in %.1fs",
                        self.settings.server, self._last_error, self.settings.recheck_interval_s)

    def _mark_up(self) -> None:
        with self._lock:
            was_up = self._server_up
            self._server_up = True
            self._last_error = ""
        self.metrics.server_up.set(1)
        if was_up is False:
            log.info("cloud server %s is back; offloading again", self.settings.server)

    def probe_server(self) -> bool:
        """Ask the server whether it is ready (health check) and update the up/down state accordingly."""
        try:
            self.client.check_ready()  # raises Unavailable saying why: refused, not gRPC, not ready, ...
        except Exception as exc:  # noqa: BLE001 - any failure means: answer on the device for now
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    @property
    def server_up(self) -> bool | None:
        """True/False after the first offload or probe; None before."""
        with self._lock:
            return self._server_up

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary for ``GET /v1/status``."""
        with self._lock:
            retry_in = max(0.0, self._retry_at - self.clock()) if self._server_up is False else 0.0
            server = {"address": self.settings.server, "up": self._server_up,
                      "replicas": self.client.snapshot() if hasattr(self.client, "snapshot") else None,
                      "last_error": self._last_error or None,
                      "retry_in_s": round(retry_in, 3), "timeout_s": self.settings.timeout_s,
                      "recheck_interval_s": self.settings.recheck_interval_s}
            counters = {"requests": dict(self._outcomes),
                        "exits": {str(b): n for b, n in self._exit_counts.items()},
                        "pending": self._pending}
            estimates = {**self.link.snapshot(),
                         "agent_overhead_ms": None if self._overhead_ms is None else round(self._overhead_ms, 4)}
        adaptive = None if self.selector is None else {
            "switches": self.selector.switches,
            "cell": None if self.selector.current is None else
            {"bandwidth_bps": self.selector.current.bandwidth_bps, "rtt_ms": self.selector.current.rtt_ms},
            "margin": self.selector.margin, "min_dwell_s": self.selector.min_dwell_s}
        cal = self.plan.exit_calibration
        return {
            "model": self.plan.model.name,
            "weights_source": self.plan.model.weights_source,
            "bundle": str(self.bundle.path),
            "input_shape": list(self.plan.input.shape),
            "num_classes": len(self.labels),
            "num_stages": self.num_stages,
            "split": self.split,
            "codec": self.codec_name,
            "exits": [{"boundary": e.boundary, "score": e.score,
                       "threshold": e.threshold if math.isfinite(e.threshold) else None,
                       "in_head": e.boundary in self.head_exits}
                      for e in sorted(self.plan.exits, key=lambda e: e.boundary)],
            "exit_calibration": None if cal is None else {
                "mode": cal.mode, "epsilon": cal.epsilon, "delta": cal.delta, "upper_bound": cal.upper_bound,
                "exit_rates": {str(b): r for b, r in cal.exit_rates.items()}},
            "drift": {"score": round(self.drift.score, 4), "detected": self.drift.drifting,
                      "alerts": self.drift.alerts, "window": self.drift.window,
                      "threshold": self.drift.threshold},
            "server": server,
            "counters": counters,
            "estimates": estimates,
            "adaptive": adaptive,
            "device": {"name": self.profile.name, "description": self.profile.description,
                       "active_watts": self.profile.active_watts, "idle_watts": self.profile.idle_watts,
                       "radio": self.profile.radio.name,
                       "energy_method": "model" if self.meter is None else f"{self.meter.method} (compute), "
                                                                           "model (radio)"},
        }

    def close(self) -> None:
        """Finish queued requests, stop the worker and close the client (and the meter's sampler)."""
        self._executor.shutdown(wait=True)
        if self.meter is not None and hasattr(self.meter, "close"):
            self.meter.close()
        try:
            self.client.close()
        except Exception:  # closing is best effort
            log.debug("closing the cloud client failed", exc_info=True)


def load_onnx_head(bundle: Bundle, settings: EdgeSettings):
    """The ONNX Runtime head for ``head_backend=onnx``: a prepared export or one made now (fp32 heads only)."""
    from edge_agent.onnx_head import OnnxHead
    from splitinfer.errors import BundleError, ConfigError

    try:
        head = (OnnxHead.load(settings.onnx_head_dir, settings.torch_threads, bundle_dir=bundle.path)
                if settings.onnx_head_dir else OnnxHead.from_bundle(bundle, settings.torch_threads))
    except BundleError as exc:
        raise ConfigError(f"head_backend=onnx: {exc}") from exc
    return head.torch_view()


def build_runtime(settings: EdgeSettings, metrics: EdgeMetrics | None = None) -> EdgeRuntime:
    """Load the bundle named by ``settings``, connect a :class:`CloudClient` and build the runtime.

    Also sets torch's (process-wide) intra-op thread count to ``settings.torch_threads``, so the CPU time
    measured per request in the worker thread is all of the request's compute.
    """
    from edge_agent.replicas import CircuitBreaker, ReplicaSet
    from edge_agent.transport import CloudClient, channel_credentials, read_token

    tune_allocator()
    torch.set_num_threads(settings.torch_threads)
    if torch.version.cuda:  # the agent never uses a GPU; CUDA's libraries alone hold ~330 MB of its memory
        log.info("torch %s is a CUDA build (CUDA %s): on a device without a GPU, a CPU-only torch "
                 "(pip install --index-url https://download.pytorch.org/whl/cpu torch) uses ~470 MB less memory",
                 torch.__version__, torch.version.cuda)
    bundle = load_bundle(settings.bundle)
    profile = get_profile(settings.device)
    credentials = (channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
                   if settings.use_tls else None)
    token = read_token(settings.auth_token_file)
    remote = [a for a in settings.servers if parse_address(a)[0] not in ("127.0.0.1", "localhost", "::1")]
    if token and credentials is None and remote:
        log.warning("a bearer token is configured without TLS: it travels in the clear to %s (set "
                    "SPLITINFER_EDGE_TLS=true or a CA)", ",".join(remote))
    clients = [CloudClient(address, bundle.plan.model.name, timeout_s=settings.timeout_s,
                           credentials=credentials, token=token, server_name=settings.tls_server_name,
                           stream=settings.stream)
               for address in settings.servers]
    client = ReplicaSet(clients, timeout_s=settings.timeout_s, backoff_s=settings.retry_backoff_s,
                        breaker=lambda: CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s,
                                                       settings.breaker_max_cooldown_s))
    meter = find_meter(idle_watts=profile.idle_watts) if settings.energy_meter == "auto" else None
    if meter is not None:
        log.info("measuring compute energy with %s", meter.describe())
    runtime = EdgeRuntime(bundle, client, settings, metrics=metrics, profile=profile, meter=meter)
    client.on_retry = lambda _address: runtime.metrics.retries.inc()
    client.on_breaker_change = lambda n_open: runtime.metrics.replicas_open.set(n_open)
    return runtime
