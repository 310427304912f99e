"""The thin grpc.aio servicer of ``inference.GRPCInferenceService``.

Each rpc authenticates the caller (:class:`~cloud_server.auth.Authenticator`), converts the message
(:mod:`splitinfer.protocol.converters`), calls the :class:`~cloud_server.dataplane.DataPlane` and converts the
answer back; errors become status codes in :mod:`cloud_server.errors`. Inference (unary or streamed) also
records the request-level metrics.

``ModelStreamInfer`` keeps one bidirectional stream open: every request read from it is handled
concurrently (so the batcher can batch a stream's requests together) and answered by exactly one
``ModelStreamInferResponse`` — the result, or ``error_message`` (``"CODE: message"``) with
``infer_response.id`` set to the request's id so the client can match it. The stream ends when the client
closes its side and every answer is written, or when the server drains: reading stops, pending requests
are answered, then the stream closes with OK and the client reconnects elsewhere (requests read in the
last ``STREAM_DRAIN_LINGER_S`` get UNAVAILABLE answers). A request may carry Triton's ``timeout`` parameter
(microseconds): past it, a queued request is dropped before compute (DEADLINE_EXCEEDED). A frame that does
not parse ends the stream with INVALID_ARGUMENT once the requests read before it are answered. At most
``STREAM_WINDOW`` requests of a stream are read and not yet answered on the wire: a client that sends without
reading its answers is simply not read further (HTTP/2 flow control pushes back), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from cloud_server.auth import Authenticator
from cloud_server.dataplane import DataPlane
from cloud_server.errors import guarded, status_for
from cloud_server.metrics import ServerMetrics
from splitinfer import wire
from splitinfer.errors import InvalidInput, Unavailable
from splitinfer.protocol import converters
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc

_END = object()
STREAM_WINDOW = 256  # most requests of one stream read but not yet answered (backpressure beyond that)
STREAM_DRAIN_LINGER_S = 0.2  # on drain, how long a stream keeps reading (answering UNAVAILABLE) before it ends


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol v2 over grpc.aio, delegating to a :class:`DataPlane`."""

    def __init__(self, dataplane: DataPlane, metrics: ServerMetrics | None = None,
                 auth: Authenticator | None = None):
        self.dataplane = dataplane
        self.metrics = metrics
        self.auth = auth or Authenticator()

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        return self.auth.identify(context.invocation_metadata(), context.peer())

    # ------------------------------------------------------------------------------- health and metadata

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        async def call() -> pb.ServerLiveResponse:
            self._client(context)
            return pb.ServerLiveResponse(live=self.dataplane.live())

        return await guarded(context, call)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        async def call() -> pb.ServerReadyResponse:
            self._client(context)
            return pb.ServerReadyResponse(ready=self.dataplane.ready())

        return await guarded(context, call)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        async def call() -> pb.ModelReadyResponse:
            self._client(context)
            return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

        return await guarded(context, call)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        async def call() -> pb.ServerMetadataResponse:
            self._client(context)
            return converters.server_metadata_to_proto(self.dataplane.server_metadata())

        return await guarded(context, call)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        async def call() -> pb.ModelMetadataResponse:
            self._client(context)
            meta = self.dataplane.model_metadata(request.name, request.version)
            return converters.model_metadata_to_proto(meta)

        return await guarded(context, call)

    # --------------------------------------------------------------------------------------- repository

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        async def call() -> pb.RepositoryIndexResponse:
            self._client(context)
            return converters.repository_index_to_proto(self.dataplane.repository_index(request.ready))

        return await guarded(context, call)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        async def call() -> pb.RepositoryModelLoadResponse:
            self._client(context)
            refuse_repository_parameters(request.parameters)
            await self.dataplane.load_model(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await guarded(context, call)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        async def call() -> pb.RepositoryModelUnloadResponse:
            self._client(context)
            refuse_repository_parameters(request.parameters, frozenset({"unload_dependents"}))
            await self.dataplane.unload_model(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await guarded(context, call)

    # -------------------------------------------------------------------------------------------- infer

    async def _infer(self, request: pb.ModelInferRequest, client: str, timeout_s: float | None
                     ) -> pb.ModelInferResponse:
        result = await self.dataplane.infer(converters.request_from_proto(request), client, timeout_s)
        return converters.response_to_proto(result)

    def _record(self, request: pb.ModelInferRequest, code: grpc.StatusCode, started: float,
                response_bytes: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(request.model_name, code.name, time.perf_counter() - started,
                                         request.ByteSize(), response_bytes)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        response_bytes = 0

        async def call() -> pb.ModelInferResponse:
            nonlocal response_bytes
            response = await self._infer(request, self._client(context), context.time_remaining())
            response_bytes = response.ByteSize()
            return response

        if self.metrics is None:
            return await guarded(context, call)
        self.metrics.inflight.inc()
        try:
            return await guarded(context, call,
                                 on_status=lambda code: self._record(request, code, started, response_bytes))
        finally:
            self.metrics.inflight.dec()

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            client = self._client(context)
            if self.dataplane.draining:
                raise Unavailable("server is shutting down; open the stream on another replica")
        except Exception as exc:  # authentication (or a draining server) refuses the whole stream
            code, message = status_for(exc)
            await context.abort(code, message)
            return
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        window = asyncio.Semaphore(STREAM_WINDOW)  # requests read but not yet answered on the wire
        failure: list[BaseException] = []

        async def answer(request: pb.ModelInferRequest) -> None:
            started = time.perf_counter()
            if self.metrics is not None:
                self.metrics.inflight.inc()
            try:
                response = await self._infer(request, client, stream_timeout_s(request))
            except Exception as exc:  # one failed request never ends the stream
                code, message = status_for(exc)
                self._record(request, code, started, 0)
                out = pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                         model_version=request.model_version, id=request.id))
            else:
                self._record(request, grpc.StatusCode.OK, started, response.ByteSize())
                out = pb.ModelStreamInferResponse(infer_response=response)
            finally:
                if self.metrics is not None:
                    self.metrics.inflight.dec()
            await answers.put(out)

        async def read() -> None:
            iterator = request_iterator.__aiter__()
            while True:
                await window.acquire()  # a client that does not read its answers stops being read
                try:
                    request = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                task = loop.create_task(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)

        async def close_when_done() -> None:
            try:
                drain = loop.create_task(self.dataplane.wait_drain())
                try:
                    await asyncio.wait({reader, drain}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    drain.cancel()
                if not reader.done():  # draining: requests read meanwhile get UNAVAILABLE, then stop reading
                    await asyncio.wait({reader}, timeout=STREAM_DRAIN_LINGER_S)
                    reader.cancel()
                try:
                    await reader
                except (asyncio.CancelledError, grpc.RpcError):
                    pass
                except Exception as exc:  # noqa: BLE001 - e.g. a frame that does not parse: end the stream
                    failure.append(exc)
                while pending:
                    await asyncio.gather(*list(pending), return_exceptions=True)
            finally:
                await answers.put(_END)

        reader = loop.create_task(read())
        closer = loop.create_task(close_when_done())
        try:
            while (item := await answers.get()) is not _END:
                yield item
                window.release()
            if failure:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"malformed message on the stream: {type(failure[0]).__name__}: {failure[0]}")
        finally:
            for task in (closer, reader, *pending):
                task.cancel()


def refuse_repository_parameters(parameters, allowed: frozenset[str] = frozenset()) -> None:
    """Triton's load parameters (config or file overrides) are not supported; ``allowed`` names are no-ops
    (``unload_dependents``, which tritonclient always sends: no model here has dependents)."""
    unsupported = sorted(set(parameters) - allowed)
    if unsupported:
        raise InvalidInput(f"repository parameters are not supported: {unsupported}; put the bundle "
                           "in the repository directory and load it by name")


def stream_timeout_s(request: pb.ModelInferRequest) -> float | None:
    """Triton's per-request ``timeout`` parameter (microseconds) as seconds; None when absent or invalid."""
    param = request.parameters.get(wire.PARAM_TIMEOUT_US)
    if param is None or param.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
        return None
    value = param.int64_param if param.WhichOneof("parameter_choice") == "int64_param" else param.uint64_param
    return value / 1e6 if value > 0 else None
