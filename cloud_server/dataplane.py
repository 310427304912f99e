"""All request logic of the cloud server, independent of gRPC and protobuf.

The servicer converts messages with :mod:`splitinfer.protocol.converters` and calls this class; it
raises domain errors (:class:`~splitinfer.errors.InvalidInput`, :class:`~splitinfer.errors.NotFound`,
:class:`~splitinfer.errors.Unavailable`) that :mod:`cloud_server.errors` maps to status codes.

A ModelInfer request carries exactly one input: ``features`` (split inference; see :mod:`splitinfer.wire`)
or ``input`` (cloud-only inference). The CPU-bound work runs in a thread pool so the event loop keeps
answering health checks and other calls while a tail runs.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

import splitinfer
from cloud_server.errors import Overloaded
from cloud_server.metrics import ServerMetrics
from cloud_server.tail import TailRuntime
from splitinfer import wire
from splitinfer.errors import InvalidInput, NotFound, Unavailable
from splitinfer.protocol.converters import (
    InferRequest,
    InferResponse,
    InferTensor,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
)

SERVER_NAME = "splitinfer"
PLATFORM = "pytorch_splitinfer"
_INPUT_NAMES = (wire.FEATURES_TENSOR, wire.INPUT_TENSOR)


@dataclass
class RunResult:
    """What one tail run produced, with its timings."""

    logits: np.ndarray
    queue_s: float
    compute_s: float
    batch: int


class DataPlane:
    """Request logic for the one model of a bundle."""

    def __init__(self, tail: TailRuntime, executor: Executor, metrics: ServerMetrics | None = None,
                 max_inflight: int = 256):
        self.tail = tail
        self.executor = executor
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.inflight = 0
        self.draining = False

    @property
    def model_name(self) -> str:
        return self.tail.model_name

    # ------------------------------------------------------------------------------------------- health

    def live(self) -> bool:
        """The process runs and answers."""
        return True

    def ready(self) -> bool:
        """Ready for inference: not draining."""
        return not self.draining

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version not in ("", wire.MODEL_VERSION):
            raise NotFound(f"unknown version {version!r} of model {name!r}; available: {wire.MODEL_VERSION}")

    def model_ready(self, name: str, version: str = "") -> bool:
        """True for the served model while not draining; NotFound for any other model or version."""
        self._check_model(name, version)
        return self.ready()

    # ----------------------------------------------------------------------------------------- metadata

    def server_metadata(self) -> ServerMetadata:
        """Server name, version and protocol extensions (none)."""
        return ServerMetadata(name=SERVER_NAME, version=splitinfer.__version__, extensions=[])

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """Inputs ``features`` (UINT8 [-1]) and ``input`` (FP32 [-1, C, H, W]); output ``logits``."""
        self._check_model(name, version)
        return ModelMetadata(
            name=self.model_name,
            versions=[wire.MODEL_VERSION],
            platform=PLATFORM,
            inputs=[
                TensorMetadata(wire.FEATURES_TENSOR, "UINT8", [-1]),
                TensorMetadata(wire.INPUT_TENSOR, "FP32", [-1, *self.tail.input_shape]),
            ],
            outputs=[TensorMetadata(wire.OUTPUT_TENSOR, "FP32", [-1, self.tail.num_classes])],
        )

    # -------------------------------------------------------------------------------------------- infer

    async def infer(self, req: InferRequest) -> InferResponse:
        """Validate a request, run the tail in the executor and build the response."""
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        self._check_model(req.model_name, req.model_version)
        for name in req.outputs:
            if name != wire.OUTPUT_TENSOR:
                raise InvalidInput(f"unknown requested output {name!r}; this model outputs "
                                   f"{wire.OUTPUT_TENSOR!r}")
        work = self._prepare(req)
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"too many requests in flight ({self.inflight}); retry later")
        self.inflight += 1
        try:
            arrived = time.perf_counter()
            result = await asyncio.get_running_loop().run_in_executor(self.executor, self._run, work, arrived)
        finally:
            self.inflight -= 1
        if self.metrics is not None:
            self.metrics.observe_run(result.queue_s, result.compute_s, result.batch)
        return InferResponse(
            model_name=self.model_name,
            model_version=wire.MODEL_VERSION,
            id=req.id,
            parameters={wire.PARAM_QUEUE_MS: result.queue_s * 1e3,
                        wire.PARAM_COMPUTE_MS: result.compute_s * 1e3},
            outputs=[InferTensor(wire.OUTPUT_TENSOR, "FP32", result.logits)],
        )

    def _prepare(self, req: InferRequest):
        """Cheap validation on the event loop; returns a zero-argument callable doing the heavy work."""
        if not req.inputs:
            raise InvalidInput(f"request has no inputs; send exactly one of {_INPUT_NAMES}")
        if len(req.inputs) > 1:
            names = [t.name for t in req.inputs]
            raise InvalidInput(f"request has {len(names)} inputs {names}; send exactly one of {_INPUT_NAMES}")
        tensor = req.inputs[0]
        if tensor.name == wire.FEATURES_TENSOR:
            return self._prepare_features(req, tensor)
        if tensor.name == wire.INPUT_TENSOR:
            return self._prepare_input(tensor)
        raise InvalidInput(f"unknown input {tensor.name!r}; this model takes one of {_INPUT_NAMES}")

    def _prepare_features(self, req: InferRequest, tensor: InferTensor):
        if tensor.datatype != "UINT8":
            raise InvalidInput(f"input {tensor.name!r} must be UINT8 (codec payload bytes), "
                               f"got {tensor.datatype}")
        if tensor.data.ndim != 1:
            raise InvalidInput(f"input {tensor.name!r} must be 1-D [payload_bytes], got shape {tensor.shape}")
        params = req.parameters
        if wire.PARAM_SPLIT not in params:
            raise InvalidInput(f"split inference needs the int64 parameter {wire.PARAM_SPLIT!r}")
        if wire.PARAM_CODEC not in params:
            raise InvalidInput(f"split inference needs the string parameter {wire.PARAM_CODEC!r}")
        split = self.tail.check_split(params[wire.PARAM_SPLIT])
        codec = params[wire.PARAM_CODEC]
        prefix = wire.CODEC_META_PREFIX
        meta = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        self.tail.check_payload_size(int(tensor.data.nbytes), split)
        if "shape" in meta:  # refuse a mismatched shape before admitting the request
            self.tail.check_meta_shape(meta["shape"], split)
        payload = tensor.data.tobytes()

        def work() -> np.ndarray:
            x = self.tail.decode_features(payload, codec, meta, split)
            return self.tail.run_tail(x, split)

        return work

    def _prepare_input(self, tensor: InferTensor):
        if tensor.datatype != "FP32":
            raise InvalidInput(f"input {tensor.name!r} must be FP32, got {tensor.datatype}")
        data = tensor.data

        def work() -> np.ndarray:
            return self.tail.run_input(data)

        return work

    def _run(self, work, arrived: float) -> RunResult:
        """Executed in a worker thread: time the queue wait and the compute."""
        started = time.perf_counter()
        logits = work()
        done = time.perf_counter()
        return RunResult(logits=logits, queue_s=started - arrived, compute_s=done - started,
                         batch=int(logits.shape[0]))
