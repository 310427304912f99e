"""A persistent ``ModelStreamInfer`` stream to one server, with reconnection.

:class:`InferStream` keeps one bidirectional stream open and multiplexes requests over it: each request gets
a stream-unique id, a sender thread writes queued requests, a receiver thread matches responses to waiting
callers by ``infer_response.id``. Per-request errors travel in ``error_message`` (``"CODE: message"``) and
become the same domain errors as unary calls. Each request carries Triton's ``timeout`` parameter, so the
server drops it unanswered-by-compute once the caller has given up; a request whose caller timed out before
it was sent is not sent at all. When the stream breaks (server killed, connection reset) or
the server ends it (draining), every request still waiting fails with
:class:`~splitinfer.errors.Unavailable` — never silently dropped — and the next request opens a new stream,
after a short backoff if the previous one failed to open. A caller's own deadline is enforced here
(``DEADLINE_EXCEEDED`` -> Unavailable) since the stream itself has none.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from splitinfer import wire
from splitinfer.errors import SplitInferError, Unavailable
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
_CLOSE = object()


class _Stream:
    """One open stream: its request queue, waiting callers, and the threads serving it."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub, metadata, on_error):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: dict[str, Future] = {}
        self.lock = threading.Lock()
        self.broken: SplitInferError | None = None
        self.broken_at = 0.0
        self.on_error = on_error
        self.call = stub.ModelStreamInfer(self._feed(), metadata=metadata)
        self.receiver = threading.Thread(target=self._receive, name="infer-stream", daemon=True)
        self.receiver.start()

    def _feed(self):
        while True:
            item = self.requests.get()
            if item is _CLOSE:
                return
            with self.lock:
                abandoned = item.id not in self.waiting
            if not abandoned:  # its caller gave up (timeout): do not make the server compute it
                yield item

    def _receive(self) -> None:
        error: SplitInferError
        try:
            for response in self.call:
                with self.lock:
                    future = self.waiting.pop(response.infer_response.id, None)
                if future is not None and not future.done():
                    future.set_result(response)
            error = Unavailable("the server closed the inference stream (draining?); retry")
        except grpc.RpcError as exc:
            error = self.on_error(exc)
        except Exception as exc:  # noqa: BLE001 - any receiver failure fails the waiting callers, loudly
            error = Unavailable(f"inference stream failed: {type(exc).__name__}: {exc}")
        with self.lock:
            self.broken = error
            self.broken_at = time.monotonic()
            waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)

    def submit(self, request_id: str, request: pb.ModelInferRequest) -> Future:
        future: Future = Future()
        with self.lock:
            if self.broken is not None:
                raise self.broken
            self.waiting[request_id] = future
        self.requests.put(request)
        return future

    def forget(self, request_id: str) -> None:
        with self.lock:
            self.waiting.pop(request_id, None)

    def close(self) -> None:
        self.requests.put(_CLOSE)
        self.call.cancel()


class InferStream:
    """Request/response over a persistent ModelStreamInfer stream (thread-safe, reconnecting)."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub, metadata, on_error,
                 reconnect_backoff_s: float = 0.2):
        self.stub = stub
        self.metadata = metadata
        self.on_error = on_error
        self.reconnect_backoff_s = reconnect_backoff_s
        self.streams_opened = 0
        self._stream: _Stream | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._broken_at = 0.0
        self._closed = False

    def _current(self) -> _Stream:
        with self._lock:
            if self._closed:
                raise Unavailable("cloud client is closed")
            stream = self._stream
            if stream is not None and stream.broken is None:
                return stream
            if stream is not None:
                self._broken_at = stream.broken_at
                stream.close()
                self._stream = None
            wait = self._broken_at + self.reconnect_backoff_s - time.monotonic()
            if wait > 0:
                raise Unavailable(f"inference stream reconnecting (next attempt in {wait * 1e3:.0f} ms)")
            self._stream = _Stream(self.stub, self.metadata, self.on_error)
            self.streams_opened += 1
            if self.streams_opened > 1:
                log.info("inference stream reopened", extra={"fields": {"streams": self.streams_opened}})
            return self._stream

    def call(self, request: pb.ModelInferRequest, timeout_s: float) -> pb.ModelInferResponse:
        """Send ``request`` (its id is replaced by a stream-unique one) and wait for its response."""
        request_id = f"s{next(self._ids)}"
        request.id = request_id
        request.parameters[wire.PARAM_TIMEOUT_US].int64_param = max(1, int(timeout_s * 1e6))
        stream = self._current()
        future = stream.submit(request_id, request)
        try:
            response: pb.ModelStreamInferResponse = future.result(timeout=timeout_s)
        except FutureTimeout:
            stream.forget(request_id)
            raise Unavailable(f"cloud server unavailable (DEADLINE_EXCEEDED): no stream answer within "
                              f"{timeout_s:.3f} s") from None
        if response.error_message:
            raise error_from_stream_message(response.error_message)
        return response.infer_response

    def close(self) -> None:
        """Close the stream (idempotent)."""
        with self._lock:
            self._closed = True
            if self._stream is not None:
                self._stream.close()
                self._stream = None


class _StreamError(grpc.RpcError):
    """A stream error message shaped like an RpcError, so one mapping serves unary and streamed calls."""

    def __init__(self, code: grpc.StatusCode | None, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details


def error_from_stream_message(message: str) -> SplitInferError:
    """``"INVALID_ARGUMENT: split 99 out of range"`` -> the domain error a unary call would raise."""
    from edge_agent.transport import error_from_rpc

    name, sep, details = message.partition(": ")
    code = grpc.StatusCode[name] if sep and name in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    return error_from_rpc(_StreamError(code, details if sep else message))
