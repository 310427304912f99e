"""Tail engines: what runs the stages after a split — eager torch, TorchScript, or ONNX Runtime.

``splitinfer cloud serve --tail-engine torch|torchscript|onnxruntime|auto`` (``SPLITINFER_CLOUD_TAIL_ENGINE``).

* ``torch`` (default): the bundle's staged model, eagerly (``staged.run(x, split, N)``), for every split.
* ``torchscript``: stages ``split..N-1`` traced with ``torch.jit.trace`` and frozen (``torch.jit.freeze``:
  constants folded, conv + batch-norm fused) — less Python per op than eager.
* ``onnxruntime``: the same stages exported with the one ONNX exporter (:func:`splitinfer.onnx_util.export_onnx`,
  dynamic batch) and run in an ONNX Runtime session (:func:`splitinfer.onnx_util.session`) with the server's
  intra-op threads: no Python per op at all.
* ``auto``: builds all three, keeps those that agree with torch, times them at batch 1 and at a batch of 8
  (round-robin rounds, medians) and keeps the fastest by the sum of the two; the choice and every figure are
  logged and reported by :attr:`EngineChoice.reason`.

An engine is built for **the bundle's planned split** (where the edge sends its features) and every boundary
with a learned codec; other splits, which a server also accepts, run on eager torch. Every non-torch engine is
checked at load against eager torch on a seeded batch of 3 (``max |diff| <= 1e-4 * max(1, max |ref|)``,
:func:`splitinfer.onnx_util.compare`); one that disagrees or cannot be built is refused (``auto``: skipped, and
the reason logged; an explicit engine: the load fails with a :class:`~splitinfer.errors.BundleError` naming it).

The learned bottleneck's decoder network has its own setting, ``--decoder-engine auto|onnxruntime|torch``
(:class:`~splitinfer.bottleneck.LearnedCodec`'s backends; ``auto``, the default, is ONNX Runtime when it loads,
measured ~4x faster than eager torch for these small networks).
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from splitinfer.errors import BundleError
from splitinfer.onnx_util import compare, export_onnx, session

log = logging.getLogger(__name__)

ENGINES = ("torch", "torchscript", "onnxruntime", "auto")
DECODER_ENGINES = ("auto", "onnxruntime", "torch")  # the learned codec's decoder: LearnedCodec's backends
CHECK_BATCH = 3
TIME_BATCHES = (1, 8)
TIME_ROUNDS = 3
TIME_RUNS = 5


class _Tail(nn.Module):
    """Stages ``k..N-1`` of a staged model as one module (one tensor in, logits out); copies its input, since a
    tail's first stage may work in place and must not write into a request's buffer."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for stage in self.stages:
            x = stage(x)
        return x


@dataclass
class Engine:
    """A callable tail for one split: ``run(x) -> logits`` (float32 torch tensors)."""

    name: str
    split: int
    run: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EngineChoice:
    """What :func:`choose` decided for one split, and why."""

    engine: Engine
    reason: str
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def _tail_module(staged, split: int) -> _Tail:
    return _Tail([staged.stages[i] for i in range(split, staged.num_stages)]).eval()


def torch_engine(staged, split: int) -> Engine:
    """Eager torch: the staged model itself."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return staged.run(x, split, staged.num_stages)

    return Engine("torch", split, run)


def torchscript_engine(staged, split: int, example: torch.Tensor) -> Engine:
    """Stages ``split..N-1`` traced and frozen."""
    module = _tail_module(staged, split)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on shape checks that are constant for a bundle
        traced = torch.jit.freeze(torch.jit.trace(module, (example.clone(),), check_trace=False).eval())

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return traced(x)

    return Engine("torchscript", split, run)


def onnxruntime_engine(staged, split: int, example: torch.Tensor, threads: int) -> Engine:
    """Stages ``split..N-1`` exported to ONNX and run by ONNX Runtime with ``threads`` intra-op threads."""
    module = _tail_module(staged, split)
    sess = session(export_onnx(module, example, "x", "y"), f"the tail after split {split}", threads=threads,
                   inputs=["x"], outputs=["y"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {"x": x.contiguous().numpy()})[0])

    return Engine("onnxruntime", split, run)


def _example(shape: list[int], batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g)


def build(name: str, staged, split: int, shape: list[int], threads: int) -> Engine:
    """Build engine ``name`` for ``split`` (boundary shape ``shape``) and check it against eager torch; raises
    BundleError when it cannot be built or disagrees."""
    reference = torch_engine(staged, split)
    if name == "torch":
        return reference
    example = _example(shape, CHECK_BATCH, seed=0)
    try:
        engine = (torchscript_engine(staged, split, example) if name == "torchscript"
                  else onnxruntime_engine(staged, split, example, threads))
        x = _example(shape, CHECK_BATCH, seed=1)
        got = engine.run(x.clone()).float().numpy()
    except BundleError:
        raise
    except Exception as exc:  # an op the tracer or exporter cannot express, a runtime refusing the graph, ...
        raise BundleError(f"tail engine {name} cannot run the tail after split {split}: "
                          f"{type(exc).__name__}: {exc}") from exc
    ref = reference.run(x.clone()).float().numpy()
    compare(f"tail engine {name} after split {split}", got, ref)
    return engine


def _time(engine: Engine, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for _ in range(TIME_RUNS):
        engine.run(x)
    return (time.perf_counter() - t0) / TIME_RUNS * 1e3


def choose(mode: str, staged, split: int, shape: list[int], threads: int) -> EngineChoice:
    """The engine for ``split``: ``mode`` itself, or for ``auto`` the fastest that agrees with torch."""
    if mode not in ENGINES:
        raise BundleError(f"unknown tail engine {mode!r}: choose one of {', '.join(ENGINES)}")
    if mode != "auto":
        return EngineChoice(build(mode, staged, split, shape, threads), f"{mode} (as configured)")
    engines: dict[str, Engine] = {}
    refused: dict[str, str] = {}
    for name in ENGINES[:-1]:
        try:
            engines[name] = build(name, staged, split, shape, threads)
        except BundleError as exc:
            refused[name] = str(exc)
            log.warning("tail engine refused", extra={"fields": {"engine": name, "split": split, "reason": str(exc)}})
    samples: dict[str, dict[int, list[float]]] = {n: {b: [] for b in TIME_BATCHES} for n in engines}
    inputs = {b: _example(shape, b, seed=2) for b in TIME_BATCHES}
    for e in engines.values():  # warm-up: first runs allocate, JIT-optimise, plan
        for b in TIME_BATCHES:
            e.run(inputs[b])
    for r in range(TIME_ROUNDS):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for name in order:
            for b in TIME_BATCHES:
                samples[name][b].append(_time(engines[name], inputs[b]))
    timings = {n: {b: round(statistics.median(v), 4) for b, v in per.items()} for n, per in samples.items()}
    best = min(timings, key=lambda n: sum(timings[n].values()))
    figures = "; ".join(f"{n} " + ", ".join(f"{timings[n][b]:.3f} ms at batch {b}" for b in TIME_BATCHES)
                        for n in timings)
    reason = f"auto: {best} is the fastest after split {split} ({figures})"
    if refused:
        reason += "; refused: " + ", ".join(refused)
    return EngineChoice(engines[best], reason, timings, refused)
