"""What runs the head on this device: a stage backend (:mod:`splitinfer.head`) and the codecs for its tensors.

Two engines, chosen by ``head_backend``:

* :class:`TorchEngine` -- the bundle's staged model (or its int8 head at the planned split) and exit heads in
  torch; torch codecs (and the bundle's learned codec at the split, if it carries one there).
* :class:`OnnxEngine` -- an exported head in ONNX Runtime, numpy codecs (the encoder of the learned codec at the
  split in ONNX Runtime). Loaded from an export directory it never imports torch: the agent then runs in a venv without
  torch (``pip install 'splitinfer[edge]'``).

The request path (:mod:`edge_agent.runtime`) sees only this interface: inputs arrive as float32 numpy
``[1, C, H, W]`` and :meth:`HeadEngine.prepare` turns them into the backend's tensor type.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer.errors import BundleError, ConfigError, InvalidInput
from splitinfer.head import StageBackend
from splitinfer.plan import Plan

log = logging.getLogger("edge_agent.engine")


class HeadEngine:
    """Base of the engines: the plan, a stage backend per split, and codecs (see the module docstring)."""

    kind = "base"
    plan: Plan
    path: Path
    """The bundle directory the plan came from."""
    exit_boundaries: list[int]
    """Exits this engine has heads for."""

    @property
    def num_stages(self) -> int:
        return len(self.plan.stages)

    def prepare(self, x: np.ndarray) -> Any:
        """A float32 ``[1, C, H, W]`` numpy input as the backend's tensor."""
        raise NotImplementedError

    def backend(self, split: int, exits: Sequence[int]) -> StageBackend:
        """The stage backend for a head cut at ``split`` stopping at ``exits``; InvalidInput when this engine
        cannot run that configuration."""
        raise NotImplementedError

    def codec(self, name: str, split: int) -> Any:
        """An encoder (``encode(h) -> (bytes, meta)``) for codec ``name`` at ``split``; InvalidInput if unknown
        or not applicable there. ``image`` is the runtime's own (it sends the upload)."""
        raise NotImplementedError

    def session(self) -> contextlib.AbstractContextManager:
        """The context requests run in (torch: inference mode)."""
        return contextlib.nullcontext()

    def describe(self) -> str:
        return self.kind


class TorchEngine(HeadEngine):
    """The head in torch, from a loaded :class:`~splitinfer.bundle.Bundle`."""

    kind = "torch"

    def __init__(self, bundle: Any) -> None:
        import torch

        from splitinfer.torch_head import TorchStages

        self._torch = torch
        self.bundle = bundle
        self.plan = bundle.plan
        self.path = Path(bundle.path)
        self.exit_boundaries = sorted(bundle.exits)
        self._fp32 = TorchStages(bundle.staged, bundle.exits)
        self._planned: StageBackend | None = None

    def prepare(self, x: np.ndarray) -> Any:
        return self._torch.from_numpy(x)

    def backend(self, split: int, exits: Sequence[int]) -> StageBackend:
        # an int8 head is quantized for the planned split; elsewhere the float32 stages run
        if split == self.plan.split and self.plan.head.kind != "fp32":
            if self._planned is None:
                from splitinfer.torch_head import TorchStages

                self._planned = TorchStages(self.bundle.staged, self.bundle.exits, head=self.bundle.edge_head())
            return self._planned
        return self._fp32

    def codec(self, name: str, split: int) -> Any:
        try:
            return self.bundle.codec_for(name, split)
        except Exception as exc:
            raise InvalidInput(f"codec {name!r} cannot be used at split {split}: {exc}") from exc

    def session(self) -> contextlib.AbstractContextManager:
        return self._torch.inference_mode()


class OnnxEngine(HeadEngine):
    """The head in ONNX Runtime (:class:`edge_agent.onnx_head.OnnxHead`) with numpy codecs."""

    kind = "onnx"

    def __init__(self, plan: Plan, head: Any, path: Path) -> None:
        self.plan = plan
        self.head = head
        self.path = Path(path)
        self.exit_boundaries = list(head.exit_boundaries)
        self._codecs: dict[tuple[str, int], Any] = {}

    def prepare(self, x: np.ndarray) -> Any:
        return np.ascontiguousarray(x, dtype=np.float32)

    def backend(self, split: int, exits: Sequence[int]) -> StageBackend:
        if not self.head.supports(split, list(exits)):
            raise InvalidInput(f"the ONNX head was not exported for split {split} with exits {list(exits)}")
        return self.head

    def codec(self, name: str, split: int) -> Any:
        key = (name, split)
        if key not in self._codecs:
            from edge_agent.onnx_head import numpy_codec

            if not self.plan.codec_applies(name, split) or name == "image":
                have = ", ".join(map(str, self.plan.learned_boundaries())) or "none"
                raise InvalidInput(f"codec {name!r} cannot be used at split {split} (known: float32, uint8-affine, "
                                   f"a learned codec where the bundle carries one: boundaries {have})")
            self._codecs[key] = numpy_codec(name, self.head, split)
        return self._codecs[key]


def torch_engine(bundle: Any, settings: Any) -> HeadEngine:
    """The engine ``settings.head_backend`` asks for, over a loaded (torch) bundle: torch, or ONNX Runtime
    from ``settings.onnx_head_dir`` (checked against the bundle) or exported in memory now (fp32 heads only)."""
    if settings.head_backend != "onnx":
        return TorchEngine(bundle)
    from edge_agent.onnx_head import OnnxHead

    try:
        head = (OnnxHead.load(settings.onnx_head_dir, settings.torch_threads, bundle_dir=bundle.path)
                if settings.onnx_head_dir else OnnxHead.from_bundle(bundle, settings.torch_threads))
    except BundleError as exc:
        raise ConfigError(f"head_backend=onnx: {exc}") from exc
    return OnnxEngine(bundle.plan, head, bundle.path)


def onnx_engine(bundle_dir: Path, head_dir: Path, threads: int = 1) -> HeadEngine:
    """The torch-free engine: ``plan.json`` of ``bundle_dir`` and the export in ``head_dir`` (which must come
    from that bundle's weights; thresholds are taken from the plan). Never imports torch."""
    from edge_agent.onnx_head import OnnxHead
    from splitinfer.plan import read_plan

    plan = read_plan(bundle_dir)
    try:
        head = OnnxHead.load(head_dir, threads, bundle_dir=bundle_dir)
    except BundleError as exc:
        raise ConfigError(f"head_backend=onnx: {exc}") from exc
    return OnnxEngine(plan, head, Path(bundle_dir))
