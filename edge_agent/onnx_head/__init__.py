"""ONNX Runtime backend for the edge head: the head's stages, its exit heads and the learned codec's encoder as
ONNX models, run with ``onnxruntime`` (1 thread, sequential), so a device can run the edge path without torch.
Importing this package does not import torch; exporting does.

Modules:

* :mod:`~edge_agent.onnx_head.manifest` -- ``onnx_head.json`` (pydantic schema) and reading an export back;
* :mod:`~edge_agent.onnx_head.export` -- :func:`export_head` (torch, imported when it runs);
* :mod:`~edge_agent.onnx_head.runtime` -- :class:`OnnxHead`, a :class:`splitinfer.head.StageBackend` on numpy
  arrays, and :class:`TorchHeadView` (the same head on torch tensors, for the torch agent);
* :mod:`~edge_agent.onnx_head.edge` -- :class:`NumpyEdge`, the torch-free request path;
* :mod:`~edge_agent.onnx_head.cli` -- ``python -m edge_agent.onnx_head export|run``.

Export and session setup go through :mod:`splitinfer.onnx_util`; the walk and the exit decision are
:func:`splitinfer.head.walk` / :func:`splitinfer.head.run_head` with :class:`splitinfer.head.ExitPolicy`; the
exits and codec per split are the plan's rules (:meth:`splitinfer.plan.Plan.exits_at`,
:meth:`~splitinfer.plan.Plan.codec_at`); the torch-free codecs are :mod:`splitinfer.codec_numpy`.

What is exported (:func:`export_head`, or :meth:`OnnxHead.from_bundle` in memory at start-up):

* one **segment** model per stretch of stages between two cut points ``a -> b`` (input ``x``: boundary ``a``,
  output ``y``: boundary ``b``). The cut points of a configuration ``(split, exits)`` are ``0``, every exit
  boundary the edge evaluates (``0 < b <= split``) and the split, exactly where the walk stops to score an
  exit; with ``fallback_tail`` also ``split -> num_stages`` (the degraded answer on the device when the server
  is down and no exit ran). The plan's configuration and, by default, every operating point's are exported;
  segment files are shared between configurations.
* one **exit** model per exit boundary (input ``x``: the boundary tensor, output ``y``: logits).
* each learned codec's **encoder** (a bundle carries any number, one per boundary): the bottleneck encoder with
  batch norm and the quantizer's affine map folded in, i.e. the very module
  :class:`splitinfer.bottleneck.LearnedCodec` runs; output: the latent in quantizer units, rounded and clipped
  to give the symbols.

Every model has a dynamic batch dimension and is checked at export against torch on a seeded batch of
realistic inputs (max abs diff <= ``1e-4 * max(1, max |reference|)``, else :class:`HeadExportError`).

On disk (``out_dir``)::

    onnx_head.json      manifest (format ``splitinfer-onnx-head``, version 1): the source bundle's weight hashes,
                        input spec (shape, mean, std, labels), boundaries, exits (threshold, score), the
                        configurations covered, the planned codec, every learned codec by boundary
                        (``learned_codecs``: bits, latent shape, coder, probability tables, encoder), and per
                        file: sha256, bytes, export check figure
    plan.json           the source bundle's plan (sha256 in the manifest): the rules for other splits and exits
    seg_AA_BB.onnx      stages AA..BB-1
    exit_BB.onnx        the exit head at boundary BB
    encoder_BB.onnx     the encoder of the learned codec at boundary BB

Running (numpy in and out, never imports torch)::

    head = OnnxHead.load("runs/bundle-onnx")                 # or OnnxHead.from_bundle(bundle) (needs torch)
    outcome = run_head(head, head.policy(), x, head.split, head.active_exits)   # x: float32 [1, C, H, W]
    edge = NumpyEdge(head)                                   # the same, plus the codec at the split
    decision = edge.infer(x)                                 # .decided_by, .label, .payload, .meta

The torch-free request path produces the same payload bytes as the torch codecs given the same boundary tensor.
``python -m edge_agent.onnx_head run`` is that path as a command; it fails if anything imported torch. See
docs/onnx-head.md for figures and limits.
"""

from edge_agent.onnx_head.cli import main
from edge_agent.onnx_head.edge import EdgeDecision, NumpyEdge
from edge_agent.onnx_head.export import CHECK_BATCH, export_head
from edge_agent.onnx_head.manifest import (
    FORMAT,
    INPUT_NAME,
    MANIFEST_FILE,
    OUTPUT_NAME,
    VERSION,
    CodecEntry,
    ExitEntry,
    FileEntry,
    HeadConfig,
    HeadExportError,
    HeadManifest,
    InputInfo,
    PlanEntry,
    SegmentEntry,
)
from edge_agent.onnx_head.runtime import OnnxHead, TorchHeadView, numpy_codec
from splitinfer.codec_numpy import UINT8_MIN_VALUES_PER_CHANNEL, LearnedEncoder, encode_float32, encode_uint8_affine
from splitinfer.imaging import normalise
from splitinfer.onnx_util import OPSET, RTOL

__all__ = [
    "CHECK_BATCH", "FORMAT", "INPUT_NAME", "MANIFEST_FILE", "OPSET", "OUTPUT_NAME", "RTOL",
    "UINT8_MIN_VALUES_PER_CHANNEL", "VERSION", "CodecEntry", "EdgeDecision", "ExitEntry", "FileEntry", "HeadConfig",
    "HeadExportError", "HeadManifest", "InputInfo", "LearnedEncoder", "NumpyEdge", "OnnxHead", "PlanEntry",
    "SegmentEntry", "TorchHeadView", "encode_float32", "encode_uint8_affine", "export_head", "main", "normalise",
    "numpy_codec",
]
