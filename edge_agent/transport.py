"""The edge agent's gRPC client of the cloud server (Open Inference Protocol v2, see :mod:`splitinfer.wire`).

Synchronous (it is called from a worker thread). Every call carries a deadline and fails fast
(``wait_for_ready=False``) while the server is down; the channel reconnects by itself with a short backoff,
so the same client works again once the server is back on the same address.

gRPC status codes become domain errors here: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, CANCELLED
and connection failures -> :class:`~splitinfer.errors.Unavailable`; INVALID_ARGUMENT ->
:class:`~splitinfer.errors.InvalidInput`; NOT_FOUND -> :class:`~splitinfer.errors.NotFound`; anything else
-> :class:`RemoteError` (with the code in the message).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_agent.stream import InferStream
from splitinfer import wire
from splitinfer.errors import ConfigError, InvalidInput, NotFound, SplitInferError, Unavailable
from splitinfer.protocol import converters
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc
from splitinfer.wire import DEFAULT_MAX_MESSAGE_BYTES

READY_TIMEOUT_S = 0.5
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


class RemoteError(SplitInferError):
    """The server answered with an unexpected status code or a malformed response."""


@dataclass
class CloudResult:
    """The answer to one inference call, with its sizes and timings."""

    logits: np.ndarray  # float32 [B, num_classes]
    bytes_sent: int  # serialized request size
    bytes_received: int  # serialized response size
    server_queue_ms: float
    server_compute_ms: float
    round_trip_s: float  # wall time of the call


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options: message size limits and a short reconnect backoff (server restarts)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]


# What gRPC's connection failures mean for the operator, by a fragment of their details (first match wins).
_CONNECT_HINTS = (
    ("Connection refused", "connection refused: nothing listens there (is `splitinfer cloud serve` running on "
                           "that host and port?)"),
    ("Failed parsing HTTP/2", "the address answers, but not with gRPC (an HTTP/1 server, e.g. a metrics "
                              "port or an http:// URL? give the cloud server's gRPC HOST:PORT)"),
    ("Domain name not found", "the host name does not resolve"),
    ("DNS resolution failed", "the host name does not resolve"),
    ("No route to host", "no route to the host"),
    ("Network is unreachable", "the network is unreachable"),
    ("Connection reset", "the connection was reset (a TLS server reached without TLS, or a proxy?)"),
    ("Ssl handshake failed", "TLS handshake failed (check tls_ca / tls_cert and the server's certificate)"),
    ("SSL_ERROR", "TLS handshake failed (check tls_ca / tls_cert and the server's certificate)"),
)


def explain_unavailable(code: grpc.StatusCode | None, details: str) -> str:
    """A one-line reason for a failed connection or call, in the operator's terms, with gRPC's own details."""
    for fragment, hint in _CONNECT_HINTS:
        if fragment in details:
            return f"{hint} [{details}]"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer before the deadline (server busy or the link too slow?) [{details}]"
    return details


def error_from_rpc(exc: grpc.RpcError) -> SplitInferError:
    """Map a failed call to a domain error (see the module docstring)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code in _UNAVAILABLE_CODES or code is None:
        name = code.name if code is not None else "connection failure"
        return Unavailable(f"cloud server unavailable ({name}): {explain_unavailable(code, details)}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    return RemoteError(f"cloud server answered {code.name}: {details}")


class CloudClient:
    """A client for one model on one cloud server address (``host:port``). Thread-safe."""

    def __init__(self, address: str, model_name: str, timeout_s: float = 2.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 server_name: str | None = None, stream: bool = False):
        self.address = address
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options: list[tuple[str, object]] = list(channel_options(max_message_bytes))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = (grpc.secure_channel(address, credentials, options=options) if credentials is not None
                         else grpc.insecure_channel(address, options=options))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._stream = InferStream(self._stub, self._metadata, error_from_rpc) if stream else None
        self._lock = threading.Lock()
        self._closed = False

    def infer_features(self, payload: bytes, meta: Mapping[str, object], split: int, codec: str,
                       request_id: str = "", timeout_s: float | None = None) -> CloudResult:
        """Split inference: send a codec payload taken at boundary ``split``; returns the tail's logits.

        ``timeout_s`` overrides the client's deadline for this call."""
        params: dict[str, object] = {wire.PARAM_SPLIT: int(split), wire.PARAM_CODEC: codec}
        params.update({wire.CODEC_META_PREFIX + k: v for k, v in meta.items()})
        tensor = converters.InferTensor(wire.FEATURES_TENSOR, "UINT8", np.frombuffer(payload, dtype=np.uint8))
        return self._infer(tensor, params, request_id, timeout_s)

    def infer_input(self, x: np.ndarray, request_id: str = "", timeout_s: float | None = None) -> CloudResult:
        """Cloud-only inference: send a normalised float32 input ``[B, C, H, W]``; returns the logits."""
        arr = np.ascontiguousarray(x, dtype=np.float32)
        return self._infer(converters.InferTensor(wire.INPUT_TENSOR, "FP32", arr), {}, request_id, timeout_s)

    def check_ready(self) -> None:
        """Return when the server answers ServerReady with ready (short deadline); otherwise raise
        :class:`Unavailable` saying why: refused, not gRPC, unresolvable, timed out, or up but not ready."""
        if self._closed:
            raise Unavailable("cloud client is closed")
        try:
            response = self._stub.ServerReady(pb.ServerReadyRequest(),
                                              timeout=min(READY_TIMEOUT_S, self.timeout_s),
                                              wait_for_ready=False, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
            if code in _UNAVAILABLE_CODES or code is None:
                raise Unavailable(f"{self.address}: {explain_unavailable(code, details)}") from None
            raise Unavailable(f"{self.address}: ServerReady answered {code.name}: {details}") from None
        except ValueError as exc:  # e.g. "Cannot invoke RPC on closed channel!"
            raise Unavailable(f"{self.address}: {exc}") from None
        if not response.ready:
            raise Unavailable(f"{self.address}: the server answers but reports not ready (loading its models "
                              "or shutting down)")

    def server_ready(self) -> bool:
        """True when the server answers ServerReady with ready; never raises (short deadline)."""
        try:
            self.check_ready()
        except Exception:  # noqa: BLE001 - by contract this never raises
            return False
        return True

    def probe_rtt(self) -> float:
        """Round-trip time of one ServerReady call (seconds); raises Unavailable when it fails."""
        t0 = time.perf_counter()
        try:
            self._stub.ServerReady(pb.ServerReadyRequest(), timeout=self.timeout_s, wait_for_ready=False,
                                   metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return time.perf_counter() - t0

    def probe_transfer(self, nbytes: int) -> tuple[int, float]:
        """Send ``nbytes`` to the link-probe model (the server answers once the whole message arrived: OK
        from ours, NOT_FOUND from other OIP servers); returns (bytes on the wire, seconds). Raises Unavailable
        when the server cannot be reached."""
        tensor = converters.InferTensor(wire.FEATURES_TENSOR, "UINT8", np.zeros(nbytes, dtype=np.uint8))
        request = converters.request_to_proto(converters.InferRequest(
            model_name=wire.PROBE_MODEL, id="probe", parameters={}, inputs=[tensor]))
        t0 = time.perf_counter()
        try:  # our server answers OK (a counted link probe), other OIP servers NOT_FOUND
            self._stub.ModelInfer(request, timeout=self.timeout_s, wait_for_ready=False, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise error_from_rpc(exc) from None
        return request.ByteSize(), time.perf_counter() - t0

    def snapshot(self) -> list[dict[str, Any]] | None:
        """Per-replica state for ``/v1/status``: None for one direct connection (a ReplicaSet lists its
        replicas)."""
        return None

    def close(self) -> None:
        """Close the channel (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._stream is not None:
                    self._stream.close()
                self._channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- internals

    def _infer(self, tensor: converters.InferTensor, params: Mapping[str, object],
               request_id: str, timeout_s: float | None = None) -> CloudResult:
        if self._closed:
            raise Unavailable("cloud client is closed")
        request = converters.request_to_proto(converters.InferRequest(
            model_name=self.model_name, id=request_id, parameters=dict(params), inputs=[tensor]))
        bytes_sent = request.ByteSize()
        started = time.perf_counter()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            if self._stream is not None:
                response = self._stream.call(request, timeout)
            else:
                response = self._stub.ModelInfer(request, timeout=timeout, wait_for_ready=False,
                                                 metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        except ValueError as exc:  # e.g. "Cannot invoke RPC on closed channel!"
            raise Unavailable(f"cloud client cannot call {self.address}: {exc}") from None
        round_trip = time.perf_counter() - started
        return self._result(response, bytes_sent, round_trip)

    def _result(self, response: pb.ModelInferResponse, bytes_sent: int, round_trip: float) -> CloudResult:
        try:
            parsed = converters.response_from_proto(response)
        except InvalidInput as exc:
            raise RemoteError(f"malformed response from the cloud server: {exc}") from None
        logits = next((t.data for t in parsed.outputs if t.name == wire.OUTPUT_TENSOR), None)
        if logits is None or logits.ndim != 2:
            raise RemoteError(f"cloud server response lacks a 2-D {wire.OUTPUT_TENSOR!r} output")

        def param(name: str) -> float:
            value = parsed.parameters.get(name, 0.0)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

        return CloudResult(
            logits=np.array(logits, dtype=np.float32),
            bytes_sent=bytes_sent,
            bytes_received=response.ByteSize(),
            server_queue_ms=param(wire.PARAM_QUEUE_MS),
            server_compute_ms=param(wire.PARAM_COMPUTE_MS),
            round_trip_s=round_trip,
        )


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def channel_credentials(ca: Path | None, cert: Path | None = None, key: Path | None = None
                        ) -> grpc.ChannelCredentials:
    """TLS credentials: trust ``ca`` (system roots when None), present ``cert``/``key`` for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "TLS CA bundle"),
                                        private_key=_read(key, "TLS client key"),
                                        certificate_chain=_read(cert, "TLS client certificate"))


def read_token(path: Path | None) -> str | None:
    """The bearer token in ``path`` (first non-empty line), or None."""
    raw = _read(path, "auth token file")
    if raw is None:
        return None
    lines = [line.strip() for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"auth token file {path} is empty")
    return lines[0]
