"""The one ONNX helper: a torch module to ONNX bytes, an ONNX Runtime session for ONNX bytes, and the export
check against torch. Used by the learned codec (:mod:`splitinfer.bottleneck`), the edge head's ONNX backend
(:mod:`edge_agent.onnx_head`) and the Triton export (:mod:`cloud_server.export_triton`).

Importing this module imports neither torch nor onnxruntime: :func:`export_onnx` and :func:`check_against`
import torch when called, :func:`session` imports onnxruntime when called, so a torch-free edge can open
sessions through it.

* :func:`export_onnx` -- the TorchScript-based exporter (``dynamo=False``: no onnxscript needed), opset 17, one
  input and one output, a dynamic batch dimension; tracer warnings silenced (shape checks are constant for a
  bundle).
* :func:`session` -- a CPU session from bytes (never from a path: ONNX Runtime then cannot follow external-data
  references), ``threads`` intra-op threads, one inter-op thread, sequential execution, warnings off. With one
  thread ONNX Runtime computes on the calling thread, so per-request CPU time stays exact. Optionally checks the
  model's input/output names and per-sample shapes.
* :func:`compare` / :func:`check_against` -- an export reproduces torch when ``max |got - ref| <= rtol *
  max(1, max |ref|)`` on a seeded batch, with the same shape and finite values.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitinfer.errors import BundleError, ConfigError

OPSET = 17
RTOL = 1e-4
"""Export check: max abs diff vs the reference must be <= RTOL * max(1, max |reference|)."""


# ---------------------------------------------------------------------------------------------- export (torch)


def export_onnx(module: Any, example: Any, input_name: str = "x", output_name: str = "y", opset: int = OPSET,
                dynamic_batch: bool = True) -> bytes:
    """``module`` (one tensor in, one out) as ONNX bytes, traced on a copy of ``example``. Needs torch; raises
    whatever the exporter raises for an op it cannot express (callers wrap it in their own error)."""
    import torch

    from splitinfer.macs import mha_fastpath_disabled

    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    buf = io.BytesIO()
    # The exporter sets eval mode and afterwards calls train(<the container's flag>) on the whole tree: a fresh
    # nn.Sequential of a staged model's eval-mode stages (StagedModel.head) would come back in training mode.
    modes = [(m, m.training) for m in module.modules()] if isinstance(module, torch.nn.Module) else []
    # nn.MultiheadAttention's fused fast path (no_grad + eval) is an op ONNX cannot express: export the plain ops
    try:
        with warnings.catch_warnings(), torch.no_grad(), mha_fastpath_disabled():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant for a bundle
            torch.onnx.export(module, (example.clone(),), buf, dynamo=False, input_names=[input_name],
                              output_names=[output_name], opset_version=opset, dynamic_axes=axes)
    finally:
        for m, training in modes:
            m.training = training
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- sessions


def onnxruntime():
    """The ``onnxruntime`` module; ConfigError when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError("running ONNX models needs onnxruntime (pip install onnxruntime)") from exc
    return ort


def session(data: bytes, name: str, threads: int = 1, *, inputs: Sequence[str] | None = None,
            outputs: Sequence[str] | None = None, in_shape: Sequence[int] | None = None,
            out_shape: Sequence[int] | None = None, error: type[Exception] = BundleError):
    """An ONNX Runtime CPU session for the model ``data`` (``name`` names it in messages).

    ``threads`` intra-op threads (>= 1, ConfigError otherwise), one inter-op thread, sequential execution,
    log level "error". With ``inputs``/``outputs`` the model's input and output names must be exactly these;
    with ``in_shape``/``out_shape`` the first input's and output's declared per-sample shapes (after the batch
    dimension) must be these. A model ONNX Runtime cannot load, or one that fails a check, raises ``error``
    (:class:`~splitinfer.errors.BundleError` by default); a missing onnxruntime raises ConfigError."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"ONNX Runtime threads must be an integer >= 1, got {threads!r}")
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    model = data if isinstance(data, bytes) else bytes(data)
    try:
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # InvalidProtobuf, Fail, InvalidGraph, ...: a corrupted or foreign file
        raise error(f"{name} is not a loadable ONNX model (corrupted?): {type(exc).__name__}: {exc}") from None
    ins, outs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    if (inputs is not None and ins != list(inputs)) or (outputs is not None and outs != list(outputs)):
        raise error(f"{name} has inputs {ins} and outputs {outs}; expected {list(inputs or ins)} and "
                    f"{list(outputs or outs)}")
    for what, args, want in (("input", sess.get_inputs(), in_shape), ("output", sess.get_outputs(), out_shape)):
        if want is not None and (not args or list(args[0].shape[1:]) != list(want)):
            got = list(args[0].shape) if args else None
            raise error(f"{name} has {what} shape {got}; expected [batch, {', '.join(map(str, want))}]")
    return sess


# ---------------------------------------------------------------------------------------------- export check


def max_abs_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """``max |got - ref|`` in float64 (0 for empty arrays)."""
    a, b = np.asarray(got), np.asarray(ref)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if b.size else 0.0


@dataclass(frozen=True)
class Agreement:
    """How an exported model's output compares with the reference."""

    max_abs_diff: float
    tolerance: float
    reference_max_abs: float


def compare(name: str, got: np.ndarray, ref: np.ndarray, *, rtol: float = RTOL, against: str = "torch",
            error: type[Exception] = BundleError) -> Agreement:
    """Check ``got`` (``name``'s output) against ``ref`` (``against``'s): same shape, finite, ``max |got - ref|
    <= rtol * max(1, max |ref|)``; raises ``error`` otherwise."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        raise error(f"{name} returns shape {list(got.shape)}, {against} {list(ref.shape)}")
    if not np.isfinite(got).all():
        raise error(f"{name} returns NaN or infinite values")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    tol = rtol * max(1.0, scale)
    diff = max_abs_diff(got, ref)
    if diff > tol:
        raise error(f"{name} disagrees with {against}: max abs diff {diff:.3g} > tolerance {tol:.3g}")
    return Agreement(diff, tol, scale)


def check_against(name: str, data: bytes, module: Any, x: Any, *, input_name: str = "x", output_name: str = "y",
                  rtol: float = RTOL, error: type[Exception] = BundleError) -> Agreement:
    """Run the exported ``data`` in ONNX Runtime on ``x`` (a torch tensor) and :func:`compare` with
    ``module(x)`` (run on a copy under ``inference_mode``: stages may work in place). Needs torch."""
    import torch

    try:
        got = session(data, name, inputs=[input_name], outputs=[output_name], error=error).run(
            None, {input_name: x.detach().contiguous().numpy()})[0]
    except error:
        raise
    except Exception as exc:  # the runtime refusing the model is a failed export, whatever it raises
        raise error(f"{name} does not run in ONNX Runtime: {type(exc).__name__}: {exc}") from exc
    with torch.inference_mode():
        ref = module(x.clone()).detach().float().numpy()
    return compare(name, got, ref, rtol=rtol, error=error)
