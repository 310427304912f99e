"""``splitinfer plan probe``: measure the link to a running cloud server with real gRPC messages.

* **RTT**: the median time of ``ServerLive`` calls (the smallest RPC) on a warm channel.
* **Throughput**: ``ModelInfer`` requests carrying ``S`` bytes to the link-probe model name
  (:data:`PROBE_MODEL`); gRPC delivers the whole message before the server answers (OK from ours, which
  counts it as a link probe; NOT_FOUND from other OIP servers), so a call
  takes ``RTT + overhead + S / bandwidth``. Sizes grow (x4) until the transfer takes ``target_s``; the
  bandwidth is the slope between the smallest and the largest size (RTT and fixed costs cancel).
* **Per-message overhead**: the serialized ``ModelInfer`` request of a split-inference call minus its
  payload (exact, from protobuf), plus HTTP/2 and gRPC framing (a 5-byte message prefix, a 9-byte header per
  16 KiB DATA frame, and :data:`HEADERS_BYTES` for the HPACK-compressed request headers on a warm
  connection, an estimate).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import grpc
import numpy as np

from splitinfer import wire
from splitinfer.protocol import converters
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc

PROBE_MODEL = wire.PROBE_MODEL
HEADERS_BYTES = 60
DATA_FRAME = 16 * 1024


@dataclass
class ProbeResult:
    """What the probe measured."""

    address: str
    rtt_ms: float
    rtt_ms_samples: list[float]
    bandwidth_bps: float | None
    sizes: list[int]
    call_ms: list[float]
    request_overhead_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)

    def make_flags(self) -> str:
        """The ``plan make`` options for this link."""
        from partitioner.cost import format_bandwidth, format_duration

        bw = "" if self.bandwidth_bps is None else f"--bandwidth {format_bandwidth(self.bandwidth_bps)} "
        return f"{bw}--rtt {format_duration(self.rtt_ms / 1e3)} --overhead {self.request_overhead_bytes}"


def request_overhead_bytes(payload_bytes: int = 1000) -> int:
    """Bytes a split-inference ModelInfer request adds to its payload on the wire (see the module docstring)."""
    params = {wire.PARAM_SPLIT: 12, wire.PARAM_CODEC: "uint8-affine",
              wire.CODEC_META_PREFIX + "shape": "96,7,7", wire.CODEC_META_PREFIX + "granularity": "channel"}
    tensor = converters.InferTensor(wire.FEATURES_TENSOR, "UINT8", np.zeros(payload_bytes, dtype=np.uint8))
    req = converters.request_to_proto(converters.InferRequest(model_name="default", id="", parameters=params,
                                                              inputs=[tensor]))
    proto = req.ByteSize() - payload_bytes
    framing = 5 + 9 * max(1, math.ceil((req.ByteSize() + 5) / DATA_FRAME)) + 9 + HEADERS_BYTES
    return int(proto + framing)


def _probe_request(size: int) -> pb.ModelInferRequest:
    tensor = converters.InferTensor(wire.FEATURES_TENSOR, "UINT8", np.zeros(size, dtype=np.uint8))
    return converters.request_to_proto(converters.InferRequest(model_name=PROBE_MODEL, id="probe", parameters={},
                                                               inputs=[tensor]))


def probe(address: str, rtt_calls: int = 10, size_calls: int = 3, target_s: float = 0.2,
          max_bytes: int = 8 << 20, timeout_s: float = 60.0) -> ProbeResult:
    """Measure RTT and throughput to the OIP server at ``address`` (``host:port``).

    Raises ConnectionError when the server cannot be reached within ``timeout_s``.
    """
    options = [("grpc.max_send_message_length", max_bytes + (1 << 20)),
               ("grpc.max_receive_message_length", 1 << 20)]
    channel = grpc.insecure_channel(address, options=options)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=min(timeout_s, 10.0))
        except grpc.FutureTimeoutError as exc:
            raise ConnectionError(f"cannot connect to {address}") from exc
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def live() -> float:
            t0 = time.perf_counter()
            stub.ServerLive(pb.ServerLiveRequest(), timeout=timeout_s)
            return time.perf_counter() - t0

        def send(size: int) -> float:
            req = _probe_request(size)
            t0 = time.perf_counter()
            try:
                stub.ModelInfer(req, timeout=timeout_s)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise ConnectionError(f"probe call to {address} failed: {exc.code().name}: {exc.details()}") \
                        from None
            return time.perf_counter() - t0

        try:
            for _ in range(2):
                live()
            rtts = [live() for _ in range(rtt_calls)]
            rtt = statistics.median(rtts)
            sizes, times = [], []
            small = 1024
            send(small)
            sizes.append(small)
            times.append(statistics.median(send(small) for _ in range(size_calls)))
            size = 64 * 1024
            while True:
                send(size)  # warm-up at this size (flow-control windows grow)
                t = statistics.median(send(size) for _ in range(size_calls))
                sizes.append(size)
                times.append(t)
                if t - times[0] >= target_s or size * 4 > max_bytes:
                    break
                size *= 4
        except grpc.RpcError as exc:
            raise ConnectionError(f"probe of {address} failed: {exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()
    dt = times[-1] - times[0]
    bandwidth = (sizes[-1] - sizes[0]) * 8 / dt if dt > 0 else None
    return ProbeResult(address=address, rtt_ms=round(rtt * 1e3, 4), rtt_ms_samples=[round(r * 1e3, 4) for r in rtts],
                       bandwidth_bps=None if bandwidth is None else round(bandwidth, 1), sizes=sizes,
                       call_ms=[round(t * 1e3, 4) for t in times], request_overhead_bytes=request_overhead_bytes())
