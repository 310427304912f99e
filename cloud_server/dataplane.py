"""All request logic of the cloud server, independent of gRPC and protobuf.

The servicer converts messages with :mod:`splitinfer.protocol.converters` and calls this class; it
raises domain errors (:class:`~splitinfer.errors.InvalidInput`, :class:`~splitinfer.errors.NotFound`,
:class:`~splitinfer.errors.Unavailable`, ...) that :mod:`cloud_server.errors` maps to status codes.

Models come from a :class:`~cloud_server.repository.ModelRepository` (one bundle, or a directory of bundles
and versions). A ModelInfer request carries exactly one input: ``features`` (split inference; see
:mod:`splitinfer.wire`) or ``input`` (cloud-only inference). Cheap checks run on the event loop; decoding
and the tail run in the model's :class:`~cloud_server.batcher.Batcher`, batched with other requests for the
same split, in a thread pool, so the event loop keeps answering health checks and other calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import splitinfer
from cloud_server.auth import ClientLimiter
from cloud_server.batcher import Batcher, BatchKey, Job
from cloud_server.decode import Staged
from cloud_server.errors import ModelControlOff, Overloaded
from cloud_server.metrics import ServerMetrics
from cloud_server.repository import IndexEntry, ModelFactory, ModelRepository, ServedModel
from cloud_server.tail import TailRuntime
from splitinfer import wire
from splitinfer.bundle import load_bundle
from splitinfer.codec import shape_from_str
from splitinfer.errors import InvalidInput, NotFound, Unavailable
from splitinfer.finite import all_finite
from splitinfer.gc_freeze import freeze_loaded
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
EXTENSIONS = ["model_repository", "parameters", "binary_tensor_data"]
_INPUT_NAMES = (wire.FEATURES_TENSOR, wire.INPUT_TENSOR)

log = logging.getLogger(__name__)


@dataclass
class BatchPolicy:
    """Dynamic batching settings of every served model (``max_batch_size=1``: no batching)."""

    max_batch_size: int = 32
    max_delay_s: float = 0.001
    max_queue: int = 256
    workers: int = 1
    inline_max_s: float = 0.0  # run a lone short job on the event loop when idle (0: never)


@dataclass(frozen=True)
class EngineSettings:
    """What runs the tails (:mod:`cloud_server.tail_engines`): engine, ONNX Runtime threads, splits, decoder."""

    tail: str = "torch"
    threads: int | None = None
    splits: tuple[int, ...] | None = None
    decoder: str = "auto"


def served_model_factory(executor: Executor, policy: BatchPolicy, max_request_batch: int = 64,
                         metrics: ServerMetrics | None = None, engines: EngineSettings | None = None) -> ModelFactory:
    """Builds a :class:`ServedModel` (tail + batcher on ``executor``) from a bundle directory."""
    eng = engines or EngineSettings()

    def build(name: str, version: str, path: Path) -> ServedModel:
        tail = TailRuntime(load_bundle(path), max_batch=max_request_batch, engine=eng.tail, threads=eng.threads,
                           engine_splits=eng.splits, decoder_engine=eng.decoder)
        for split, choice in tail.engine_choices.items():
            log.info("tail engine", extra={"fields": {"model": name, "version": version, "split": split,
                                                      "engine": choice.engine.name, "reason": choice.reason}})
        depth = batch = None
        if metrics is not None:
            metrics.add_model(name)
            depth = metrics.queue_depth_reporter(name, version)
            batch = lambda samples, seconds: metrics.observe_batch(name, samples, seconds)  # noqa: E731
        batcher = Batcher(lambda key, x: tail.run_tail(x, key.split), executor,
                          max_batch_size=policy.max_batch_size, max_delay_s=policy.max_delay_s,
                          max_queue=policy.max_queue, workers=policy.workers, on_queue_depth=depth,
                          on_batch=batch, inline_max_s=policy.inline_max_s)
        return ServedModel(name=name, version=version, tail=tail, batcher=batcher)

    return build


class DataPlane:
    """Request logic over the models of a repository."""

    def __init__(self, repository: ModelRepository, metrics: ServerMetrics | None = None,
                 max_inflight: int = 256, limiter: ClientLimiter | None = None, model_control: bool = True):
        self.repository = repository
        self.model_control = model_control  # repository load/unload allowed (off in multi-process servers)
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.limiter = limiter or ClientLimiter(0)
        self.inflight = 0
        self.admitted = 0  # requests that passed admission (each is answered: result or error)
        self.completed = 0  # of those, answered with a result
        self.draining = False
        self.drain_started: asyncio.Event | None = None
        # called after a repository load/unload (the server keeps per-model health statuses with it)
        self.on_models_changed: Callable[[], Awaitable[None]] | None = None

    @classmethod
    async def for_bundle(cls, bundle: Path, executor: Executor, policy: BatchPolicy | None = None,
                         max_request_batch: int = 64, **kwargs) -> DataPlane:
        """A data plane serving one bundle, loaded (handy for tests and embedding)."""
        factory = served_model_factory(executor, policy or BatchPolicy(), max_request_batch,
                                       kwargs.get("metrics"))
        repository = ModelRepository(factory, bundle=bundle)
        await repository.load_all()
        return cls(repository, **kwargs)

    # ------------------------------------------------------------------------------------------- health

    def live(self) -> bool:
        """The process runs and answers."""
        return True

    def ready(self) -> bool:
        """Ready for inference: not draining and at least one model loaded."""
        return not self.draining and bool(self.repository.models)

    def begin_drain(self) -> None:
        """Refuse new inference from now on (UNAVAILABLE); streams end once their requests are answered."""
        self.draining = True
        if self.drain_started is not None:
            self.drain_started.set()

    async def wait_drain(self) -> None:
        """Return once draining has begun (open streams use it to stop reading and close)."""
        if self.drain_started is None:
            self.drain_started = asyncio.Event()
        if self.draining:
            return
        await self.drain_started.wait()

    def model_ready(self, name: str, version: str = "") -> bool:
        """True for a loaded model while not draining; False for one on disk but not loaded; else NotFound."""
        try:
            self.repository.get(name, version)
        except NotFound:
            if any(e.name == name and (not version or e.version == version) for e in self.repository.index()):
                return False
            raise
        return self.ready()

    # ----------------------------------------------------------------------------------------- metadata

    def server_metadata(self) -> ServerMetadata:
        """Server name, version and protocol extensions."""
        return ServerMetadata(name=SERVER_NAME, version=splitinfer.__version__, extensions=list(EXTENSIONS))

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """Inputs ``features`` (UINT8 [-1]) and ``input`` (FP32 [-1, C, H, W]); output ``logits``."""
        model = self.repository.get(name, version)
        versions = sorted(self.repository.models.get(model.name, {}), key=int)
        return ModelMetadata(
            name=model.name,
            versions=versions if not version else [model.version],
            platform=PLATFORM,
            inputs=[
                TensorMetadata(wire.FEATURES_TENSOR, "UINT8", [-1]),
                TensorMetadata(wire.INPUT_TENSOR, "FP32", [-1, *model.tail.input_shape]),
            ],
            outputs=[TensorMetadata(wire.OUTPUT_TENSOR, "FP32", [-1, model.tail.num_classes])],
        )

    # --------------------------------------------------------------------------------------- repository

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version on disk or loaded, with its state."""
        return self.repository.index(ready_only)

    async def load_model(self, name: str) -> None:
        """(Re)load a model from the repository."""
        self._check_model_control("load")
        if self.draining:
            raise Unavailable("server is shutting down")
        try:
            await self.repository.load(name)
        finally:  # new objects out of the collector's walks, a retired copy's cycles collected
            freeze_loaded()
            await self._models_changed()

    async def unload_model(self, name: str) -> None:
        """Unload a model after its queued requests are answered."""
        self._check_model_control("unload")
        try:
            await self.repository.unload(name)
        finally:
            freeze_loaded()
            await self._models_changed()

    def _check_model_control(self, what: str) -> None:
        if not self.model_control:
            raise ModelControlOff(f"cannot {what} models while the server runs several processes (--processes): "
                                  "each has its own copy of the models; change the repository and restart the "
                                  "server")

    async def _models_changed(self) -> None:
        if self.on_models_changed is not None:
            await self.on_models_changed()

    # -------------------------------------------------------------------------------------------- infer

    async def infer(self, req: InferRequest, client: str = "", timeout_s: float | None = None) -> InferResponse:
        """Validate a request, queue it for its model's batcher and build the response.

        ``client`` is the caller's identity (per-client concurrency limit); ``timeout_s`` what is left of
        the caller's deadline: a request still queued when it passes is dropped before compute.
        """
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if req.model_name == wire.PROBE_MODEL:  # a link probe: the message has arrived, that is all it asks
            return InferResponse(model_name=wire.PROBE_MODEL, id=req.id, outputs=[])
        model = self.repository.get(req.model_name, req.model_version)
        for name in req.outputs:
            if name != wire.OUTPUT_TENSOR:
                raise InvalidInput(f"unknown requested output {name!r}; this model outputs "
                                   f"{wire.OUTPUT_TENSOR!r}")
        job = self._job(model.tail, req)
        job.timeout_s = timeout_s
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"too many requests in flight ({self.inflight}); retry later")
        with self.limiter.slot(client):
            self.inflight += 1
            self.admitted += 1
            try:
                result = await model.batcher.submit(job)
            finally:
                self.inflight -= 1
        if not all_finite(result.logits):
            raise InvalidInput("the features decode to values the tail cannot handle: non-finite logits "
                               "(corrupted or out-of-range payload)")
        self.completed += 1
        if self.metrics is not None:
            self.metrics.observe_queue(model.name, result.queue_s)
        return InferResponse(
            model_name=model.name,
            model_version=model.version,
            id=req.id,
            parameters={wire.PARAM_QUEUE_MS: result.queue_s * 1e3,
                        wire.PARAM_COMPUTE_MS: result.compute_s * 1e3},
            outputs=[InferTensor(wire.OUTPUT_TENSOR, "FP32", result.logits)],
        )

    def _job(self, tail: TailRuntime, req: InferRequest) -> Job:
        """Cheap validation on the event loop; the returned job decodes in a worker thread."""
        if not req.inputs:
            raise InvalidInput(f"request has no inputs; send exactly one of {_INPUT_NAMES}")
        if len(req.inputs) > 1:
            names = [t.name for t in req.inputs]
            raise InvalidInput(f"request has {len(names)} inputs {names}; send exactly one of {_INPUT_NAMES}")
        tensor = req.inputs[0]
        if tensor.name == wire.FEATURES_TENSOR:
            return self._features_job(tail, req, tensor)
        if tensor.name == wire.INPUT_TENSOR:
            return self._input_job(tail, tensor)
        raise InvalidInput(f"unknown input {tensor.name!r}; this model takes one of {_INPUT_NAMES}")

    @staticmethod
    def _features_job(tail: TailRuntime, req: InferRequest, tensor: InferTensor) -> Job:
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
        split = tail.check_split(params[wire.PARAM_SPLIT])
        codec = params[wire.PARAM_CODEC]
        prefix = wire.CODEC_META_PREFIX
        meta = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        tail.check_payload_size(int(tensor.data.nbytes), split)
        samples = 1
        if "shape" in meta:  # refuse a mismatched shape before admitting the request
            tail.check_meta_shape(meta["shape"], split)
            samples = shape_from_str(meta["shape"])[0]
        payload = tensor.data.tobytes()

        def prepare() -> torch.Tensor | Staged:
            return tail.prepare_features(payload, codec, meta, split)

        return Job(key=BatchKey.features(split), samples=samples, prepare=prepare)

    @staticmethod
    def _input_job(tail: TailRuntime, tensor: InferTensor) -> Job:
        if tensor.datatype != "FP32":
            raise InvalidInput(f"input {tensor.name!r} must be FP32, got {tensor.datatype}")
        data: np.ndarray = tensor.data
        samples = tail.check_input_shape(data)

        def prepare() -> torch.Tensor:
            return tail.input_tensor(data)

        return Job(key=BatchKey.model_input(), samples=samples, prepare=prepare)


