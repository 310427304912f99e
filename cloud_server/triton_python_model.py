"""The Triton Python-backend model of ``splitinfer cloud export-triton --backend python`` (copied as ``model.py``).

Not imported by the project itself: Triton's Python-backend stub imports it, in the environment the model's
``EXECUTION_ENV_PATH`` names (this project's virtual environment, where ``cloud_server`` and ``splitinfer`` are
installed). One file, two roles (config parameter ``ROLE``), the steps of the exported ensemble:

* ``decode`` (no batching): input ``features`` UINT8 ``[payload_bytes]`` with the request parameters ``split``,
  ``codec`` and ``codec.<key>`` — exactly what the edge agent sends to ``splitinfer cloud serve`` — decoded by
  :class:`~cloud_server.tail.TailRuntime` (the same checks, the same codecs) into ``x`` FP32 ``[B, n]`` (the
  boundary tensor flattened, so that every split fits the tail's one ragged input).
* ``tail`` (``max_batch_size`` > 0, dynamic batching, ragged input): Triton hands ``execute`` every request of a
  batch; they are grouped by split, each group's tensors concatenated, the tail run once per group
  (``TailRuntime.run_tail``: the configured tail engine), and the logits sliced back per request.

Tensors cross the stub only by DLPack: Triton 2.51's stub was built with pybind11 2.10, which predates numpy 2,
and with numpy 2 ``Tensor.as_numpy()`` repeats the first element and ``pb_utils.Tensor(name, ndarray)`` carries
0 bytes. Errors answer the request with ``INVALID_ARG`` (bad input) or ``INTERNAL``, one answer per request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


def _param(config: dict, key: str, default: str | None = None) -> str | None:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


class TritonPythonModel:
    """One step of the splitinfer ensemble (see the module docstring)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        root = _param(config, "SPLITINFER_ROOT")
        if root and root not in sys.path:
            sys.path.insert(0, root)
        import numpy as np
        import torch

        from cloud_server.decode import finish_prepared
        from cloud_server.tail import TailRuntime
        from splitinfer.bundle import load_bundle
        from splitinfer.errors import InvalidInput

        self.np, self.torch, self.finish_prepared, self.InvalidInput = np, torch, finish_prepared, InvalidInput
        threads = int(_param(config, "TORCH_THREADS", "1"))
        torch.set_num_threads(threads)
        self.role = _param(config, "ROLE")
        if self.role not in ("decode", "tail"):
            raise ValueError(f"config parameter ROLE must be decode or tail, not {self.role!r}")
        bundle = Path(args["model_repository"]).parent / _param(config, "BUNDLE")
        splits = _param(config, "TAIL_ENGINE_SPLITS")
        self.tail = TailRuntime(load_bundle(bundle), max_batch=int(_param(config, "MAX_REQUEST_BATCH", "64")),
                                engine=_param(config, "TAIL_ENGINE", "torch") if self.role == "tail" else "torch",
                                threads=threads, engine_splits=[int(k) for k in splits.split(",")] if splits else None)
        pb_utils.Logger.log_info(f"splitinfer {self.role}: {self.tail.model_name} from {bundle}, torch "
                                 f"{torch.__version__}, numpy {np.__version__}, {threads} thread(s), engines "
                                 f"{ {k: e.name for k, e in self.tail.engines.items()} }")

    # ------------------------------------------------------------------------------------------------ helpers

    def _request_args(self, request) -> tuple[int, object, dict]:
        """(split, codec, meta) from the request-level parameters (Triton gives them as a JSON object)."""
        params = json.loads(request.parameters() or "{}")
        if "split" not in params:
            raise self.InvalidInput("split inference needs the int64 request parameter 'split'")
        if "codec" not in params:
            raise self.InvalidInput("split inference needs the string request parameter 'codec'")
        meta = {k[len("codec."):]: v for k, v in params.items() if k.startswith("codec.")}
        return self.tail.check_split(params["split"]), params["codec"], meta

    def _payload(self, request) -> bytes:
        tensor = pb_utils.get_input_tensor_by_name(request, "features")
        if tensor is None:
            raise self.InvalidInput("this model takes the input 'features' (UINT8 [payload_bytes])")
        data = self.np.from_dlpack(tensor)  # never as_numpy(): see the module docstring
        if data.ndim != 1 or data.dtype != self.np.uint8:
            raise self.InvalidInput(f"input 'features' must be UINT8 [payload_bytes], got {data.dtype} "
                                    f"{list(data.shape)}")
        return data.tobytes()  # a copy: the request's shared memory goes away after execute

    def _tensor(self, name: str, value) -> object:
        t = value if isinstance(value, self.torch.Tensor) else self.torch.from_numpy(self.np.ascontiguousarray(value))
        return pb_utils.Tensor.from_dlpack(name, t.contiguous())

    def _error(self, exc: BaseException) -> object:
        code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, self.InvalidInput) else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}", code))

    # ------------------------------------------------------------------------------------------------ execute

    def execute(self, requests: list) -> list:
        """One response per request, in order."""
        return self._decode(requests) if self.role == "decode" else self._tail(requests)

    def _decode(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                split, codec, meta = self._request_args(request)
                payload = self._payload(request)
                self.tail.check_payload_size(len(payload), split)
                x = self.tail.decode_features(payload, codec, meta, split)
                responses.append(pb_utils.InferenceResponse([self._tensor("x", x.reshape(x.shape[0], -1))]))
            except Exception as exc:  # noqa: BLE001 - answered to that request
                responses.append(self._error(exc))
        return responses

    def _tail(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[int, list[tuple[int, object]]] = {}
        for i, request in enumerate(requests):
            try:
                split = self._request_args(request)[0]
                flat = self.torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, "x")).clone()
                x = self.tail.checked_features(flat.reshape(flat.shape[0], *self.tail.boundary_shape(split)), split)
                groups.setdefault(split, []).append((i, x))
            except Exception as exc:  # noqa: BLE001
                responses[i] = self._error(exc)
        for split, members in groups.items():
            xs = [x for _, x in members]
            try:
                logits = self.tail.run_tail(xs[0] if len(xs) == 1 else self.torch.cat(xs), split)
            except Exception as exc:  # noqa: BLE001 - the whole group failed
                for i, _ in members:
                    responses[i] = self._error(exc)
                continue
            offset = 0
            for i, x in members:
                n = int(x.shape[0])
                responses[i] = pb_utils.InferenceResponse([self._tensor("logits", logits[offset:offset + n])])
                offset += n
        return responses

    def finalize(self) -> None:
        """Nothing to release (the tail's sessions go with the process)."""
