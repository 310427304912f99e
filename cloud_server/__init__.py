"""The cloud server: runs the tail of a split model behind the Open Inference Protocol v2 over gRPC.

Layers, outermost first: :mod:`cloud_server.cli` (parses options) -> :mod:`cloud_server.server` (the grpc.aio
server, health, reflection, signals) -> :mod:`cloud_server.servicer` (thin protobuf glue) ->
:mod:`cloud_server.dataplane` (all request logic) -> :mod:`cloud_server.tail` (decode + run the tail).
Domain errors are mapped to gRPC status codes only in :mod:`cloud_server.errors`.
"""
