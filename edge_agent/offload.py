"""The offloader: the edge agent's only view of the cloud server, and the only place that tracks its health.

It owns the client (a :class:`~edge_agent.replicas.ReplicaSet` of :class:`~edge_agent.transport.CloudClient`
in the daemon). Reconnection lives in gRPC and per-replica retries and circuit breakers in the replica set;
the offloader keeps the agent-level answer to "should this request try the server?": after a failure the
server is considered down and requests are answered on the device without trying it until
``recheck_interval_s`` has passed; then one request (or the readiness probe) tries again and a success marks it
up again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from edge_agent.metrics import EdgeMetrics
from splitinfer.errors import InvalidInput, NotFound, Unavailable

log = logging.getLogger("edge_agent.offload")


class CloudClientLike(Protocol):
    """What the agent needs from a cloud client (:class:`~edge_agent.transport.CloudClient` and
    :class:`~edge_agent.replicas.ReplicaSet` implement all of it)."""

    def infer_features(self, payload: bytes, meta: Mapping[str, object], split: int, codec: str,
                       request_id: str = "") -> Any:
        """Send one encoded feature tensor; the answer has ``logits`` and, when known, ``bytes_sent``,
        ``bytes_received``, ``server_queue_ms``, ``server_compute_ms`` and ``round_trip_s``."""
        ...

    def check_ready(self) -> None:
        """Return when the server is ready, else raise Unavailable saying why."""
        ...

    def probe_rtt(self) -> float:
        """Seconds of one small round trip."""
        ...

    def probe_transfer(self, nbytes: int) -> tuple[int, float]:
        """(bytes on the wire, seconds) of one ``nbytes`` message."""
        ...

    def snapshot(self) -> list[dict[str, Any]] | None:
        """Per-replica state, or None for a single connection."""
        ...

    def close(self) -> None: ...


def refused(exc: BaseException) -> bool:
    """True when the server refused the request itself (bad request, unknown model): it is not down."""
    return isinstance(exc, InvalidInput | NotFound)


class Offloader:
    """Sends offloads and tracks whether the server is up (thread-safe). ``client`` None: an edge-only agent
    with no server (every offload fails as Unavailable)."""

    def __init__(self, client: CloudClientLike | None, address: str, recheck_interval_s: float, timeout_s: float,
                 metrics: EdgeMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.address = address
        self.recheck_interval_s = recheck_interval_s
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._up: bool | None = None
        self._retry_at = 0.0
        self._last_error = ""
        metrics.server_up.set(0)

    def _client(self) -> CloudClientLike:
        if self.client is None:
            raise Unavailable("no cloud server is configured")
        return self.client

    @property
    def up(self) -> bool | None:
        """True/False after the first offload or probe; None before."""
        with self._lock:
            return self._up

    def should_try(self) -> bool:
        """True when a request should try the server: it is up (or unknown), or its recheck is due (then the
        next recheck is scheduled: one attempt per interval)."""
        with self._lock:
            if self._up is not False:
                return True
            now = self.clock()
            if now >= self._retry_at:
                self._retry_at = now + self.recheck_interval_s
                return True
            return False

    def send(self, payload: bytes, meta: Mapping[str, object], split: int, codec: str, request_id: str) -> Any:
        """One offload; marks the server up on success and down on failure (unless the server refused the
        request itself), and raises the failure."""
        try:
            res = self._client().infer_features(payload, dict(meta), split, codec, request_id)
        except Exception as exc:
            if refused(exc):
                log.warning("cloud server refused request %s: %s; answering on the device", request_id, exc)
            else:
                self.mark_down(exc)
            raise
        self.mark_up()
        return res

    def failed(self, exc: BaseException) -> None:
        """An offload's answer turned out unusable (e.g. malformed logits): the server counts as down."""
        self.mark_down(exc)

    def mark_down(self, exc: BaseException, quiet: bool = False) -> None:
        """The server failed (``exc`` says how): down until the next recheck. Logged once per outage unless
        ``quiet``."""
        with self._lock:
            was_up = self._up
            self._up = False
            self._retry_at = self.clock() + self.recheck_interval_s
            self._last_error = str(exc) if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {exc}"
        self.metrics.server_up.set(0)
        if was_up is not False and not quiet:
            log.warning("cloud server %s unavailable (%s); answering on the device, retry in %.1fs",
                        self.address, self._last_error, self.recheck_interval_s)

    def mark_up(self) -> None:
        with self._lock:
            was_up = self._up
            self._up = True
            self._last_error = ""
        self.metrics.server_up.set(1)
        if was_up is False:
            log.info("cloud server %s is back; offloading again", self.address)

    def check(self, quiet: bool = False) -> bool:
        """Ask the server whether it is ready (health check) and update the up/down state accordingly
        (``quiet``: the caller reports an outage itself)."""
        try:
            self._client().check_ready()  # raises Unavailable saying why: refused, not gRPC, not ready, ...
        except Exception as exc:  # noqa: BLE001 - any failure means: answer on the device for now
            self.mark_down(exc, quiet)
            return False
        self.mark_up()
        return True

    def probe_rtt(self) -> float:
        return self._client().probe_rtt()

    def probe_transfer(self, nbytes: int) -> tuple[int, float]:
        return self._client().probe_transfer(nbytes)

    @property
    def last_error(self) -> str | None:
        with self._lock:
            return self._last_error or None

    def status(self) -> dict[str, Any]:
        """The ``server`` section of ``/v1/status``."""
        with self._lock:
            retry_in = max(0.0, self._retry_at - self.clock()) if self._up is False else 0.0
            up, last_error = self._up, self._last_error
        return {"address": self.address, "up": up,
                "replicas": None if self.client is None else self.client.snapshot(),
                "last_error": last_error or None, "retry_in_s": round(retry_in, 3), "timeout_s": self.timeout_s,
                "recheck_interval_s": self.recheck_interval_s}

    def close(self) -> None:
        if self.client is None:
            return
        try:
            self.client.close()
        except Exception:  # closing is best effort
            log.debug("closing the cloud client failed", exc_info=True)
