"""Online re-profiling: how fast the edge and the server really are, against what the plan predicted.

The operating-point table was planned from profiles measured on another day (or, for the server, on another
machine). Every request tells the agent how long its own part took (head, exits, encoding, its own work: the
request's wall time minus the network call) and, when it offloaded, how long the server spent on it (queue +
compute, reported in each answer). Against the plan's prediction for the configuration that ran it
(``OperatingPoint.edge_part_ms``, ``server_ms``) these give two scale factors:

* ``edge_scale`` = EWMA(measured edge ms) / EWMA(predicted edge ms), over the requests that ran at least one layer
  on the device (split > 0: at split 0 the device only encodes or forwards the input, which says nothing of its
  compute speed; a forwarded JPEG would make it look many times faster than profiled);
* ``server_scale`` = EWMA(reported server ms) / EWMA(predicted server ms), over offloads.

A ratio of averages rather than an average of ratios: requests that exit early take a fraction of the predicted
mean (which is over the exit rates), those that run the whole head take more; their sums compare like for like.
The averages follow a switch between configurations (each request is compared with its own configuration's
prediction). The averages are slow (alpha 0.02: the last ~50 requests): a device's speed wanders by tens of
percent over seconds (other processes, thermal limits, a shared host), and a fast average made the agent leave
edge-only for an offload over a few slow seconds after a bandwidth drop, then come back 2 s later. A factor is 1
until ``min_samples`` observations have been made, and is clamped to ``[1 / max_scale, max_scale]`` (a wildly
different factor means a wrong table, not a slow device). Edgent (Li et
al.) corrects its latency regression models from online measurements in the same spirit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class _RatioOfMeans:
    """EWMAs of a measured and a predicted quantity, and their ratio."""

    alpha: float
    measured: float = 0.0
    predicted: float = 0.0
    samples: int = 0

    def observe(self, measured: float, predicted: float) -> None:
        if self.samples == 0:
            self.measured, self.predicted = measured, predicted
        else:
            self.measured += self.alpha * (measured - self.measured)
            self.predicted += self.alpha * (predicted - self.predicted)
        self.samples += 1

    def ratio(self, min_samples: int, max_scale: float) -> float:
        if self.samples < min_samples or self.predicted <= 0 or self.measured <= 0:
            return 1.0
        return min(max_scale, max(1.0 / max_scale, self.measured / self.predicted))


class OnlineProfile:
    """Thread-safe running estimates of the edge's and the server's speed relative to the plan's profile."""

    def __init__(self, alpha: float = 0.02, min_samples: int = 30, max_scale: float = 4.0) -> None:
        if not 0 < alpha <= 1 or min_samples < 1 or max_scale < 1:
            raise ValueError("alpha must be in (0, 1], min_samples >= 1 and max_scale >= 1")
        self.min_samples = min_samples
        self.max_scale = max_scale
        self._edge = _RatioOfMeans(alpha)
        self._server = _RatioOfMeans(alpha)
        self._lock = threading.Lock()

    def observe(self, edge_ms: float, predicted_edge_ms: float | None, server_ms: float | None = None,
                predicted_server_ms: float | None = None) -> None:
        """One request: its measured edge time and, when it was offloaded, the server's reported time, each with
        the plan's prediction for the configuration that ran it (None: no prediction, nothing learnt)."""
        with self._lock:
            if predicted_edge_ms is not None and predicted_edge_ms > 0 and edge_ms >= 0:
                self._edge.observe(edge_ms, predicted_edge_ms)
            if server_ms is not None and predicted_server_ms is not None and predicted_server_ms > 0 \
                    and server_ms >= 0:
                self._server.observe(server_ms, predicted_server_ms)

    @property
    def edge_scale(self) -> float:
        with self._lock:
            return self._edge.ratio(self.min_samples, self.max_scale)

    @property
    def server_scale(self) -> float:
        with self._lock:
            return self._server.ratio(self.min_samples, self.max_scale)

    def scales(self) -> tuple[float, float]:
        """(edge_scale, server_scale) read together."""
        with self._lock:
            return (self._edge.ratio(self.min_samples, self.max_scale),
                    self._server.ratio(self.min_samples, self.max_scale))

    def snapshot(self) -> dict[str, float | int]:
        """For ``/v1/status``."""
        with self._lock:
            return {"edge_scale": round(self._edge.ratio(self.min_samples, self.max_scale), 4),
                    "server_scale": round(self._server.ratio(self.min_samples, self.max_scale), 4),
                    "edge_samples": self._edge.samples, "server_samples": self._server.samples,
                    "edge_measured_ms": round(self._edge.measured, 4),
                    "edge_predicted_ms": round(self._edge.predicted, 4),
                    "server_measured_ms": round(self._server.measured, 4),
                    "server_predicted_ms": round(self._server.predicted, 4)}


class ConfigResiduals:
    """Per configuration of the table: its requests' measured latency against its plain prediction (the plan's
    profiles) at the link of the moment, as a ratio of EWMAs.

    The scale factors (:class:`OnlineProfile`) correct the device's and the server's speed for every configuration
    at once, but only from the configurations that exercise them (no request at split 0 shows the device's compute
    speed), and the rest of the error (the link model: a real link is not the planner's ``bytes / bandwidth +
    RTT``; encoding or forwarding that the profile got wrong) differs per configuration: only that configuration's
    own requests measure it, and a near tie is decided by a few percent. The selector predicts a configuration
    with a factor as plain prediction x factor (:meth:`edge_agent.adapt.OperatingPointSelector.predicted`).
    A configuration has no factor until ``min_samples`` requests ran it; each sample is capped at ``max_factor`` x
    its prediction (a request caught in a link change the estimate has not seen yet says nothing about the model),
    and the factors are forgotten when the link estimate makes a step change (:meth:`clear`): they describe the
    model's error at one link."""

    def __init__(self, alpha: float = 0.05, min_samples: int = 3, max_factor: float = 2.0) -> None:
        if not 0 < alpha <= 1 or min_samples < 1 or max_factor < 1:
            raise ValueError("alpha must be in (0, 1], min_samples >= 1 and max_factor >= 1")
        self.alpha = alpha
        self.min_samples = min_samples
        self.max_factor = max_factor
        self._by_config: dict[tuple, _RatioOfMeans] = {}
        self._last: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def observe(self, key: tuple, measured_ms: float, predicted_ms: float, now: float) -> None:
        """A request of configuration ``key`` took ``measured_ms``; the (rescaled) prediction was ``predicted_ms``."""
        if predicted_ms <= 0 or measured_ms < 0:
            return
        with self._lock:
            r = self._by_config.setdefault(key, _RatioOfMeans(self.alpha))
            r.observe(min(measured_ms, self.max_factor * predicted_ms), predicted_ms)
            self._last[key] = now

    def factor(self, key: tuple) -> float:
        with self._lock:
            r = self._by_config.get(key)
            return 1.0 if r is None else r.ratio(self.min_samples, self.max_factor)

    def factors(self) -> dict[tuple, float]:
        """The factor of every configuration with ``min_samples`` requests (the others are not listed)."""
        with self._lock:
            return {k: r.ratio(self.min_samples, self.max_factor) for k, r in self._by_config.items()
                    if r.samples >= self.min_samples}

    def known(self, key: tuple, now: float, refresh_s: float) -> bool:
        """True when ``key`` has ``min_samples`` requests and its last one is younger than ``refresh_s``."""
        with self._lock:
            r = self._by_config.get(key)
            return r is not None and r.samples >= self.min_samples and now - self._last[key] < refresh_s

    def clear(self) -> None:
        with self._lock:
            self._by_config.clear()
            self._last.clear()

    def snapshot(self) -> list[dict]:
        """For ``/v1/status``: per configuration (split, codec, exits), its factor and sample count."""
        with self._lock:
            return [{"split": k[0], "codec": k[1], "exits": list(k[2]),
                     "factor": round(r.ratio(self.min_samples, self.max_factor), 4), "samples": r.samples}
                    for k, r in sorted(self._by_config.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
