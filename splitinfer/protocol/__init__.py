"""The Open Inference Protocol v2 wire: generated gRPC stubs and the one protobuf <-> numpy mapping.

``grpc_service_pb2*`` are generated from ``protos/splitinfer/protocol/grpc_service.proto`` by
``scripts/gen_protos.py`` (never edit them by hand). :mod:`splitinfer.protocol.converters` is the only
module that turns protobuf messages into numpy arrays and plain Python values, and back; only the transport
modules (``cloud_server`` servicer/server, ``edge_agent.transport``) import the generated stubs.
"""
