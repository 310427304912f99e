"""The thin grpc.aio servicer of ``inference.GRPCInferenceService``.

Each rpc converts the message (:mod:`splitinfer.protocol.converters`), calls the
:class:`~cloud_server.dataplane.DataPlane` and converts the answer back; errors become status codes in
:func:`cloud_server.errors.guarded`. ModelInfer also records the request-level metrics.
"""

from __future__ import annotations

import time

import grpc

from cloud_server.dataplane import DataPlane
from cloud_server.errors import guarded
from cloud_server.metrics import ServerMetrics
from splitinfer.protocol import converters
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol v2 over grpc.aio, delegating to a :class:`DataPlane`."""

    def __init__(self, dataplane: DataPlane, metrics: ServerMetrics | None = None):
        self.dataplane = dataplane
        self.metrics = metrics

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        async def call() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=self.dataplane.live())

        return await guarded(context, call)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        async def call() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.dataplane.ready())

        return await guarded(context, call)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        async def call() -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

        return await guarded(context, call)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        async def call() -> pb.ServerMetadataResponse:
            return converters.server_metadata_to_proto(self.dataplane.server_metadata())

        return await guarded(context, call)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        async def call() -> pb.ModelMetadataResponse:
            meta = self.dataplane.model_metadata(request.name, request.version)
            return converters.model_metadata_to_proto(meta)

        return await guarded(context, call)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        response_bytes = 0

        async def call() -> pb.ModelInferResponse:
            nonlocal response_bytes
            result = await self.dataplane.infer(converters.request_from_proto(request))
            response = converters.response_to_proto(result)
            response_bytes = response.ByteSize()
            return response

        def record(code: grpc.StatusCode) -> None:
            if self.metrics is not None:
                self.metrics.observe_request(request.model_name, code.name, time.perf_counter() - started,
                                             request.ByteSize(), response_bytes)

        if self.metrics is None:
            return await guarded(context, call)
        self.metrics.inflight.inc()
        try:
            return await guarded(context, call, on_status=record)
        finally:
            self.metrics.inflight.dec()
