"""Link estimation on the edge: RTT and uplink bandwidth from real transfers and light probes, smoothed, with
change detection.

Every offload is an observation ``t = rtt + bytes * 8 / bandwidth`` (``t``: the round trip minus the server's
reported queue and compute time). Small probes (``ServerReady``) observe the RTT alone.

* **RTT**: an EWMA of probe round trips and of small offloads (at most ``RTT_ONLY_BYTES``, minus their
  serialization at the current bandwidth estimate). A large transfer never updates the RTT: on its own it
  cannot tell a slower link from a longer path, so the agent probes the RTT every few seconds.
* **Bandwidth**: ``bytes * 8 / (t - rtt)`` from larger transfers where ``t - rtt`` is at least 20 % of ``t``
  and 1 ms, so the RTT estimate's error does not dominate.
* **Change detection** (per quantity, in log space): a fast EWMA (alpha 0.5) and a slow one (alpha 0.1). When
  they differ by more than ``change_ratio`` for ``confirm`` observations in a row, both restart at the median of
  those observations and a change is counted (the median: the first of them often straddles the change, a request
  half sent before a drop; their mean put a 50 -> 1 Mbit/s drop at 1.46 Mbit/s). The reported estimate is the slow
  one: stable on a steady link, and within a few observations of a step change (Wi-Fi to LTE, a congested uplink).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

RTT_ONLY_BYTES = 4096
MIN_TRANSFER_FRACTION = 0.2
MIN_TRANSFER_S = 0.001


@dataclass
class _Tracker:
    """Fast and slow EWMAs of log(value) with step-change detection."""

    fast_alpha: float = 0.5
    slow_alpha: float = 0.1
    change_ratio: float = 1.5
    confirm: int = 3
    fast: float | None = None
    slow: float | None = None
    pending: int = 0
    recent: tuple[float, ...] = ()
    changes: int = 0
    samples: int = 0

    def observe(self, value: float) -> bool:
        """Add a sample; True when it confirmed a step change."""
        if not (value > 0 and math.isfinite(value)):
            return False
        x = math.log(value)
        self.samples += 1
        if self.fast is None or self.slow is None:
            self.fast = self.slow = x
            return False
        self.fast += self.fast_alpha * (x - self.fast)
        self.slow += self.slow_alpha * (x - self.slow)
        if abs(self.fast - self.slow) > math.log(self.change_ratio):
            self.pending += 1
            self.recent = (*self.recent, x)
            if self.pending >= self.confirm:  # restart both averages at the new level
                self.slow = self.fast = statistics.median(self.recent)
                self.pending = 0
                self.recent = ()
                self.changes += 1
                return True
        else:
            self.pending = 0
            self.recent = ()
        return False

    @property
    def value(self) -> float | None:
        return None if self.slow is None else math.exp(self.slow)


class LinkEstimator:
    """Thread-safe RTT and bandwidth estimates from passive observations and active probes."""

    def __init__(self, change_ratio: float = 1.5, confirm: int = 3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rtt = _Tracker(change_ratio=change_ratio, confirm=confirm)
        self._bw = _Tracker(change_ratio=change_ratio, confirm=confirm)
        self._lock = threading.Lock()
        self.clock = clock
        self.last_observation: float | None = None
        self.last_bandwidth_sample: float | None = None
        self.last_change: float | None = None

    def observe_rtt(self, rtt_s: float) -> None:
        """A probe's round trip (no payload to speak of)."""
        with self._lock:
            self._note(self._rtt.observe(rtt_s))

    def observe_transfer(self, nbytes: int, network_s: float) -> None:
        """An offload: ``nbytes`` moved (request + response) in ``network_s`` of network time."""
        if network_s <= 0 or nbytes < 0:
            return
        with self._lock:
            rtt, bw = self._rtt.value, self._bw.value
            if nbytes <= RTT_ONLY_BYTES or rtt is None:
                serialization = nbytes * 8 / bw if bw else 0.0
                self._note(self._rtt.observe(max(network_s - serialization, 1e-6)))
                return
            transfer = network_s - rtt
            if transfer >= max(MIN_TRANSFER_FRACTION * network_s, MIN_TRANSFER_S):
                self._note(self._bw.observe(nbytes * 8 / transfer))
                self.last_bandwidth_sample = self.clock()
            else:
                self.last_observation = self.clock()

    def _note(self, changed: bool) -> None:
        now = self.clock()
        self.last_observation = now
        if changed:
            self.last_change = now

    @property
    def rtt_s(self) -> float | None:
        with self._lock:
            return self._rtt.value

    @property
    def bandwidth_bps(self) -> float | None:
        with self._lock:
            return self._bw.value

    def snapshot(self) -> dict[str, float | int | None]:
        """For ``/v1/status``."""
        with self._lock:
            return {"bandwidth_bps": None if self._bw.value is None else round(self._bw.value, 1),
                    "rtt_s": None if self._rtt.value is None else round(self._rtt.value, 6),
                    "bandwidth_samples": self._bw.samples, "rtt_samples": self._rtt.samples,
                    "changes": self._bw.changes + self._rtt.changes,
                    "seconds_since_change": None if self.last_change is None
                    else round(self.clock() - self.last_change, 3)}
