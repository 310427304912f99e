"""An MLServer (1.7.1) custom runtime serving the same split tail as ``splitinfer cloud serve``.

Used by :mod:`bench.serving` only, inside MLServer's own virtual environment (MLServer's pins conflict with
this project's; see that module's docstring). Not imported by the project itself.

What it runs is exactly what our server runs: the bundle loaded with :func:`splitinfer.bundle.load_bundle`,
the payload decoded by :meth:`cloud_server.tail.TailRuntime.decode_features` (the same codec classes, the same
checks) and the tail run by :meth:`~cloud_server.tail.TailRuntime.run_tail` (``staged.run(x, split, N)`` under
``torch.inference_mode``). With MLServer's adaptive batching the runtime gets one merged request per batch; as
our batcher does, it decodes each request's payload on its own (the learned bottleneck's decoder network once
for the batch: :meth:`~cloud_server.tail.TailRuntime.decode_many`), concatenates the tensors, runs the tail once
and returns the ``[B, classes]`` logits, which MLServer splits back per request.

Request formats it accepts (one input named ``features``):

* ``BYTES``, shape ``[1]`` per request: the codec payload the edge would send to our server, unchanged (one
  BYTES element; MLServer's batcher concatenates the elements of the merged requests, so a batch of B
  requests arrives as B payloads). The parameters our server reads from the request (``split``, ``codec`` and
  the codec meta ``codec.<key>``) travel as parameters of the *input tensor*: MLServer's batcher keeps one
  request's request-level parameters for the whole batch, but merges input-level parameters into per-request
  lists, so every payload keeps its own meta.
* ``FP32``, shape ``[1, *boundary]``: the decoded boundary tensor (what our server's decoder produces), with
  the input parameter ``split``; MLServer converts the raw bytes to a Python list and back (its own tensor
  path), the runtime only reshapes and runs the tail.

Settings (model-settings.json ``parameters.extra``): ``bundle`` (directory), ``torch_threads`` (torch
intra-op threads, as ``SPLITINFER_CLOUD_TORCH_THREADS``), ``workers`` (threads running batches at once, as
``SPLITINFER_CLOUD_WORKERS``: the CPU work runs in a thread pool so MLServer's event loop keeps serving, as
ours does), ``max_batch`` (largest batch a single request may carry, as ``SPLITINFER_CLOUD_MAX_REQUEST_BATCH``),
``tail_engine`` and ``tail_engine_splits`` (as ``SPLITINFER_CLOUD_TAIL_ENGINE`` / ``_SPLITS``: the same tail
engine as ours). The bundle is loaded in a thread that ends, as our server loads it (splitinfer/omp_teams.py).
The process also gets the same malloc tuning as our daemons (:func:`splitinfer.allocator.tune_allocator`).
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from mlserver import MLModel
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from cloud_server.tail import TailRuntime
from splitinfer import wire
from splitinfer.allocator import tune_allocator
from splitinfer.bundle import load_bundle
from splitinfer.errors import InvalidInput
from splitinfer.omp_teams import run_in_own_thread


def _per_request(value, n: int, name: str) -> list:
    """An input parameter after MLServer's batch merge: a scalar (one request, or all equal) or a list of n."""
    if isinstance(value, list):
        if len(value) != n:
            raise InferenceError(f"parameter {name!r} has {len(value)} values for {n} requests")
        return value
    return [value] * n


class SplitTailModel(MLModel):
    """Decode + tail of a splitinfer bundle behind MLServer (see the module docstring)."""

    async def load(self) -> bool:
        extra = dict(self.settings.parameters.extra or {}) if self.settings.parameters else {}
        tune_allocator()
        threads = int(extra.get("torch_threads", 1))
        if extra.get("gil_switch_interval_ms"):  # as our server's setting of the same name
            sys.setswitchinterval(float(extra["gil_switch_interval_ms"]) / 1e3)
        torch.set_num_threads(threads)
        splits = extra.get("tail_engine_splits")

        def build() -> TailRuntime:
            return TailRuntime(load_bundle(extra["bundle"]), max_batch=int(extra.get("max_batch", 64)),
                               engine=extra.get("tail_engine", "torch"), threads=threads,
                               engine_splits=None if splits is None else [int(k) for k in splits])

        # loaded in a thread that ends, as our server loads: a thread that lived on would keep an OpenMP team
        # beside the workers' and slow every op of the tail (splitinfer/omp_teams.py)
        self.tail = await run_in_own_thread(build, name="load-model")
        self.executor = ThreadPoolExecutor(max_workers=int(extra.get("workers", 1)),
                                           thread_name_prefix="tail")
        return True

    async def unload(self) -> bool:
        self.executor.shutdown(wait=True, cancel_futures=True)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1 or payload.inputs[0].name != wire.FEATURES_TENSOR:
            raise InferenceError(f"send exactly one input named {wire.FEATURES_TENSOR!r}")
        inp = payload.inputs[0]
        params = inp.parameters.model_dump(exclude_none=True) if inp.parameters is not None else {}
        data = getattr(inp.data, "root", inp.data)
        if inp.datatype == "BYTES":
            n = len(data)
            splits = _per_request(params.get(wire.PARAM_SPLIT), n, wire.PARAM_SPLIT)
            codecs = _per_request(params.get(wire.PARAM_CODEC), n, wire.PARAM_CODEC)
            prefix = wire.CODEC_META_PREFIX
            metas = [{} for _ in range(n)]
            for key, value in params.items():
                if key.startswith(prefix):
                    for m, v in zip(metas, _per_request(value, n, key), strict=True):
                        m[key[len(prefix):]] = v
            if len(set(splits)) != 1:
                raise InferenceError(f"one batch mixes splits {sorted(set(splits))}")
            work = self._features_work(list(data), codecs, metas, splits[0])
        elif inp.datatype == "FP32":
            split = params.get(wire.PARAM_SPLIT)
            if isinstance(split, list):
                if len(set(split)) != 1:
                    raise InferenceError(f"one batch mixes splits {sorted(set(split))}")
                split = split[0]
            work = self._tensor_work(np.asarray(data, dtype=np.float32).reshape(inp.shape), split)
        else:
            raise InferenceError(f"input {wire.FEATURES_TENSOR!r} must be BYTES or FP32, got {inp.datatype}")
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        except InvalidInput as exc:
            raise InferenceError(str(exc)) from exc
        return InferenceResponse(
            model_name=self.name, model_version=self.version,
            outputs=[ResponseOutput(name=wire.OUTPUT_TENSOR, shape=list(logits.shape), datatype="FP32",
                                    data=logits.ravel().tolist())])

    def _features_work(self, payloads: list[bytes], codecs: list, metas: list[dict], split):
        def work() -> np.ndarray:
            k = self.tail.check_split(split)
            return self.tail.run_tail(self.tail.decode_many(payloads, codecs, metas, k), k)

        return work

    def _tensor_work(self, arr: np.ndarray, split):
        def work() -> np.ndarray:
            k = self.tail.check_split(split)
            x = torch.from_numpy(arr)
            if list(x.shape[1:]) != self.tail.boundary_shape(k):
                raise InvalidInput(f"features shape {list(x.shape)} does not match boundary {k}")
            return self.tail.run_tail(x, k)

        return work
