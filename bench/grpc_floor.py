"""The least a Python gRPC server can do per split-inference request: the floor under ``grpc_overhead_ms_p50``.

``python -m bench.grpc_floor --bundle DIR --port P [--torch-threads N]`` serves ``ModelInfer`` (and
``ServerLive``/``ServerReady``/``ModelReady``, always true: to wait for it and to time a bare call) on a bare
``grpc.aio`` server with one generic handler, and nothing else: no batcher, no thread pool, no authentication,
no metrics, no admission, no deadline handling. Each request is
parsed with :mod:`splitinfer.protocol.converters`, decoded and run through the tail inline on the event loop
(:meth:`cloud_server.tail.TailRuntime.decode_features` and :meth:`~cloud_server.tail.TailRuntime.run_tail`,
exactly the calls ``bench.serving`` times in-process), and answered with the logits.

``bench.serving`` measures this server with the same client and the same requests as ``ours-b1``, in turns
with it: the difference between its round trip and the in-process call is what grpcio, the loopback and a CPU
that idles between requests cost on this machine with no server logic at all. Not a product server: it
refuses nothing and serves one bundle's tail only; it binds to the loopback. Like the daemons it fixes
malloc's thresholds (:func:`splitinfer.allocator.tune_allocator`) and freezes the loaded objects for the GC.
"""

from __future__ import annotations

import argparse
import asyncio
import gc

import grpc
import numpy as np
import torch

from cloud_server.tail import TailRuntime
from splitinfer import wire
from splitinfer.allocator import tune_allocator
from splitinfer.bundle import load_bundle
from splitinfer.protocol import converters
from splitinfer.protocol import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


def answer(runtime: TailRuntime, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """Decode the request's features, run the tail, and return the logits (errors surface as grpc UNKNOWN)."""
    req = converters.request_from_proto(request)
    tensor = req.inputs[0]
    params = req.parameters
    prefix = wire.CODEC_META_PREFIX
    meta = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    split = int(params[wire.PARAM_SPLIT])
    x = runtime.decode_features(tensor.data.tobytes(), params[wire.PARAM_CODEC], meta, split)
    logits: np.ndarray = runtime.run_tail(x, split)
    return converters.response_to_proto(converters.InferResponse(
        model_name=req.model_name, model_version="1", id=req.id, parameters={},
        outputs=[converters.InferTensor(wire.OUTPUT_TENSOR, "FP32", logits)]))


def _always(name: str) -> grpc.RpcMethodHandler:
    request_type, response_type = getattr(pb, f"{name}Request"), getattr(pb, f"{name}Response")
    field = "live" if name == "ServerLive" else "ready"

    async def handler(request, context):
        return response_type(**{field: True})

    return grpc.unary_unary_rpc_method_handler(handler, request_type.FromString, response_type.SerializeToString)


async def serve(bundle: str, port: int, engine: str = "torch", engine_split: int | None = None) -> None:
    """Serve until killed."""
    runtime = TailRuntime(load_bundle(bundle), engine=engine,
                          engine_splits=None if engine_split is None else [engine_split])
    gc.collect()
    gc.freeze()

    async def model_infer(request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return answer(runtime, request)

    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer, pb.ModelInferRequest.FromString,
                                                          pb.ModelInferResponse.SerializeToString),
        **{name: _always(name) for name in ("ServerLive", "ServerReady", "ModelReady")}})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", wire.DEFAULT_MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((handlers,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--tail-engine", default="torch", help="as splitinfer cloud serve's")
    ap.add_argument("--engine-split", type=int, default=None)
    args = ap.parse_args(argv)
    tune_allocator()  # as the daemons do
    torch.set_num_threads(args.torch_threads)
    asyncio.run(serve(args.bundle, args.port, args.tail_engine, args.engine_split))


if __name__ == "__main__":
    main()
