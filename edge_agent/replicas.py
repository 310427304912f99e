"""Client-side balancing over several cloud server replicas, with retries and a circuit breaker each.

:class:`ReplicaSet` looks like one :class:`~edge_agent.transport.CloudClient` to the runtime. Each call:

1. picks the replica with the fewest calls in flight among those whose breaker lets calls through
   (ties: round robin);
2. on :class:`~splitinfer.errors.Unavailable` (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, a dead
   connection) or a server-side fault (INTERNAL, UNAUTHENTICATED, a malformed answer) records a failure
   and retries on *another* replica after a short jittered backoff (``backoff_s * 2**attempt``), while the
   call's overall deadline (``timeout_s``) allows;
3. INVALID_ARGUMENT and NOT_FOUND are the request's fault and are raised at once.

Inference is idempotent, so retrying a request whose answer was lost is safe; the agent still answers its
own caller exactly once.

:class:`CircuitBreaker` per replica: CLOSED until ``failure_threshold`` consecutive failures, then OPEN for a
cooldown (doubling on each failed trial, up to ``max_cooldown_s``); after the cooldown one trial call goes
through (HALF_OPEN): success closes the breaker, failure re-opens it. A replica whose breaker is open costs
nothing: no connection attempt, no timeout. When every breaker is open the call fails at once with
Unavailable and the runtime answers on the device (degraded).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from splitinfer.errors import InvalidInput, NotFound, SplitInferError, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with exponential cooldown and a single half-open trial."""

    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 1.0, max_cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1 or cooldown_s <= 0 or max_cooldown_s < cooldown_s:
            raise ValueError("need failure_threshold >= 1 and 0 < cooldown_s <= max_cooldown_s")
        self.failure_threshold = failure_threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.cooldown_s = cooldown_s
        self.opened_at = 0.0
        self.trial_in_flight = False
        self.opens = 0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a call go to this replica now? (Claims the half-open trial when it returns True for it.)"""
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == OPEN and self.clock() - self.opened_at >= self.cooldown_s:
                self.state = HALF_OPEN
                self.trial_in_flight = False
            if self.state == HALF_OPEN and not self.trial_in_flight:
                self.trial_in_flight = True
                return True
            return False

    def available(self) -> bool:
        """Like :meth:`allow` but claims nothing (for choosing among replicas)."""
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == OPEN:
                return self.clock() - self.opened_at >= self.cooldown_s
            return not self.trial_in_flight

    def record_success(self) -> None:
        """A call succeeded: close the breaker and reset the cooldown."""
        with self._lock:
            self.state = CLOSED
            self.failures = 0
            self.cooldown_s = self.base_cooldown_s
            self.trial_in_flight = False

    def record_failure(self) -> bool:
        """A call failed with an availability error; returns True when this opened the breaker."""
        with self._lock:
            self.trial_in_flight = False
            if self.state == HALF_OPEN:
                self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
                self._open()
                return True
            self.failures += 1
            if self.state == CLOSED and self.failures >= self.failure_threshold:
                self._open()
                return True
            if self.state == OPEN:
                self.opened_at = self.clock()
            return False

    def _open(self) -> None:
        self.state = OPEN
        self.opened_at = self.clock()
        self.opens += 1

    def snapshot(self) -> dict[str, Any]:
        """State for ``/v1/status``."""
        with self._lock:
            retry_in = max(0.0, self.opened_at + self.cooldown_s - self.clock()) if self.state == OPEN else 0.0
            return {"state": self.state, "consecutive_failures": self.failures, "opens": self.opens,
                    "cooldown_s": round(self.cooldown_s, 3), "retry_in_s": round(retry_in, 3)}


@dataclass
class Replica:
    """One server address: its client, breaker and counters."""

    address: str
    client: Any
    breaker: CircuitBreaker
    inflight: int = 0
    calls: int = 0
    failures: int = 0


class ReplicaSet:
    """Several :class:`~edge_agent.transport.CloudClient` behind the same interface (thread-safe)."""

    def __init__(self, clients: Sequence[Any], timeout_s: float = 2.0, backoff_s: float = 0.02,
                 breaker: Callable[[], CircuitBreaker] = CircuitBreaker,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[str], None] | None = None):
        if not clients:
            raise ValueError("need at least one server address")
        self.replicas = [Replica(c.address, c, breaker()) for c in clients]
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.clock = clock
        self.sleep = sleep
        self.on_retry = on_retry
        self.on_breaker_change: Callable[[int], None] | None = None
        self.retries = 0
        self._next = 0
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """All addresses, comma-separated."""
        return ",".join(r.address for r in self.replicas)

    # ------------------------------------------------------------------------------------- the interface

    def infer_features(self, payload: bytes, meta: Mapping[str, object], split: int, codec: str,
                       request_id: str = "") -> Any:
        """Split inference on some replica (see the module docstring for retries)."""
        return self._call(lambda c, t: c.infer_features(payload, meta, split, codec, request_id, timeout_s=t))

    def infer_input(self, x: np.ndarray, request_id: str = "") -> Any:
        """Cloud-only inference on some replica."""
        return self._call(lambda c, t: c.infer_input(x, request_id, timeout_s=t))

    def check_ready(self) -> None:
        """Return when any replica whose breaker allows calls reports ready (updates the breakers); otherwise
        raise :class:`Unavailable` with each replica's reason."""
        reasons = []
        for replica in self._order():
            if not replica.breaker.allow():
                reasons.append(f"{replica.address}: circuit breaker open")
                continue
            try:
                replica.client.check_ready()
            except Exception as exc:  # noqa: BLE001 - every failure is a reason for this replica
                reasons.append(str(exc))
                if replica.breaker.record_failure():
                    self._breakers_changed()
                continue
            self._succeeded(replica)
            return
        if len(reasons) == 1:
            raise Unavailable(reasons[0])
        raise Unavailable("no server replica is ready: " + "; ".join(reasons))

    def server_ready(self) -> bool:
        """True when any replica whose breaker allows calls reports ready (updates the breakers)."""
        try:
            self.check_ready()
        except Unavailable:
            return False
        return True

    def probe_rtt(self) -> float:
        """RTT of the preferred replica (link probes measure the path to where requests go)."""
        return self._call(lambda c, t: c.probe_rtt())

    def probe_transfer(self, nbytes: int) -> tuple[int, float]:
        """Throughput probe to the preferred replica."""
        return self._call(lambda c, t: c.probe_transfer(nbytes))

    def close(self) -> None:
        """Close every client."""
        for replica in self.replicas:
            replica.client.close()

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-replica state for ``/v1/status``."""
        with self._lock:
            rows = [(r.address, r.inflight, r.calls, r.failures) for r in self.replicas]
        return [{"address": a, "inflight": i, "calls": c, "failures": f, **r.breaker.snapshot()}
                for (a, i, c, f), r in zip(rows, self.replicas, strict=True)]

    # ------------------------------------------------------------------------------------------ internals

    def _order(self) -> list[Replica]:
        """Replicas to try, best first: breaker available, then fewest in flight, then round robin."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.replicas)
            rotated = self.replicas[start:] + self.replicas[:start]
            return sorted(rotated, key=lambda r: (not r.breaker.available(), r.inflight))

    def _succeeded(self, replica: Replica) -> None:
        was_closed = replica.breaker.state == CLOSED
        replica.breaker.record_success()
        if not was_closed:
            log.info("circuit breaker closed again for replica %s", replica.address)
            self._breakers_changed()

    def _breakers_changed(self) -> None:
        if self.on_breaker_change is not None:
            self.on_breaker_change(sum(r.breaker.state != CLOSED for r in self.replicas))

    def _call(self, fn: Callable[[Any, float], T]) -> T:
        deadline = self.clock() + self.timeout_s
        tried: set[str] = set()
        last: Exception | None = None
        attempt = 0
        while True:
            candidates = [r for r in self._order() if r.address not in tried]
            left = deadline - self.clock()
            if left <= 0:
                break
            replica = next((r for r in candidates if r.breaker.allow()), None)
            if replica is None:
                break
            if attempt:
                self.retries += 1
                if self.on_retry is not None:
                    self.on_retry(replica.address)
            tried.add(replica.address)
            with self._lock:
                replica.inflight += 1
                replica.calls += 1
            try:
                result = fn(replica.client, left)
            except (InvalidInput, NotFound):
                self._succeeded(replica)  # the replica answered; the request was at fault
                raise
            except SplitInferError as exc:  # unavailable, or a server-side fault: try another replica
                last = exc
                with self._lock:
                    replica.failures += 1
                if replica.breaker.record_failure():
                    log.warning("circuit breaker opened for replica %s: %s", replica.address, exc)
                    self._breakers_changed()
            else:
                self._succeeded(replica)
                return result
            finally:
                with self._lock:
                    replica.inflight -= 1
            attempt += 1
            pause = min(self.backoff_s * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0),
                        max(0.0, deadline - self.clock()))
            if pause > 0:
                self.sleep(pause)
        if last is not None:
            raise Unavailable(f"no replica answered ({len(tried)} tried): {last}") from None
        raise Unavailable("every replica's circuit breaker is open; answering on the device")
