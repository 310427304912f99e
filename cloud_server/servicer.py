"""The thin grpc.aio servicer of ``inference.GRPCInferenceService``.

Every rpc is wrapped by :func:`rpc`, the one place that authenticates the caller
(:class:`~cloud_server.auth.Authenticator`) and turns an exception into its status code
(:func:`cloud_server.errors.status_for`); ModelInfer's wrapper also records the request-level metrics. A method
body only converts the message (:mod:`splitinfer.protocol.converters`), calls the
:class:`~cloud_server.dataplane.DataPlane` and converts the answer back.

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
import contextlib
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable

import grpc

from cloud_server.auth import Authenticator
from cloud_server.dataplane import DataPlane
from cloud_server.errors import status_for
from cloud_server.metrics import ServerMetrics
from splitinfer import wire
from splitinfer.errors import InvalidInput, Unavailable
from splitinfer.protocol import converters
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc

_END = object()
STREAM_WINDOW = 256  # most requests of one stream read but not yet answered (backpressure beyond that)
STREAM_DRAIN_LINGER_S = 0.2  # on drain, how long a stream keeps reading (answering UNAVAILABLE) before it ends


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises") from exc


def rpc(method: Callable | None = None, *, metered: bool = False) -> Callable:
    """The wrapper of every rpc of :class:`InferenceServicer`: ``method(self, request, context, client)`` is
    called with the authenticated caller's identity, and an exception it raises (authentication's included)
    ends the call with the status :func:`~cloud_server.errors.status_for` maps it to.

    A response-streaming method (an async generator) is wrapped the same way: an exception before or between
    its answers ends the stream with its status. ``metered`` (ModelInfer) also counts the call in flight and
    records it in the request metrics with its final status, failures included."""
    if method is None:
        return functools.partial(rpc, metered=metered)

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: InferenceServicer, request, context: grpc.aio.ServicerContext):
            try:
                client = self._client(context)
                async with contextlib.aclosing(method(self, request, context, client)) as answers:
                    async for answer in answers:
                        yield answer
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self: InferenceServicer, request, context: grpc.aio.ServicerContext):
        record = metered and self.metrics is not None
        if not record:
            try:
                return await method(self, request, context, self._client(context))
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc)
        started, code, response_bytes = time.perf_counter(), None, 0
        self.metrics.inflight.inc()
        try:
            response = await method(self, request, context, self._client(context))
            code, response_bytes = grpc.StatusCode.OK, response.ByteSize()
            return response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code = status_for(exc)[0]
            await _abort(context, exc)
        finally:
            self.metrics.inflight.dec()
            if code is not None:  # not for a cancelled call
                self._record(request, code, started, response_bytes)

    return unary


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

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext, client: str
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext, client: str
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext, client: str
                         ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext,
                             client: str) -> pb.ServerMetadataResponse:
        return converters.server_metadata_to_proto(self.dataplane.server_metadata())

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext,
                            client: str) -> pb.ModelMetadataResponse:
        return converters.model_metadata_to_proto(self.dataplane.model_metadata(request.name, request.version))

    # --------------------------------------------------------------------------------------- repository

    @rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext,
                              client: str) -> pb.RepositoryIndexResponse:
        return converters.repository_index_to_proto(self.dataplane.repository_index(request.ready))

    @rpc
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext,
                                  client: str) -> pb.RepositoryModelLoadResponse:
        refuse_repository_parameters(request.parameters)
        await self.dataplane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext, client: str
                                    ) -> pb.RepositoryModelUnloadResponse:
        refuse_repository_parameters(request.parameters, frozenset({"unload_dependents"}))
        await self.dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

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

    @rpc(metered=True)
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, client: str
                         ) -> pb.ModelInferResponse:
        return await self._infer(request, client, context.time_remaining())

    @rpc
    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext, client: str
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        if self.dataplane.draining:  # refuses the whole stream
            raise Unavailable("server is shutting down; open the stream on another replica")
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
                raise InvalidInput(f"malformed message on the stream: {type(failure[0]).__name__}: {failure[0]}")
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
