"""The exported head on ONNX Runtime: :class:`OnnxHead`, a :class:`splitinfer.head.StageBackend` on numpy
arrays (no torch), and :class:`TorchHeadView`, the same head on torch tensors for the torch agent."""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.onnx_head.manifest import (
    INPUT_NAME,
    OUTPUT_NAME,
    HeadManifest,
    bundle_plan,
    cuts,
    read_export_plan,
    read_manifest,
    read_models,
    with_plan_exits,
)
from splitinfer.codec_numpy import LearnedEncoder, NumpyEncoder
from splitinfer.codec_numpy import numpy_codec as _numpy_codec
from splitinfer.errors import ConfigError, InvalidInput
from splitinfer.finite import all_finite
from splitinfer.head import ExitPolicy
from splitinfer.onnx_util import session
from splitinfer.plan import Plan, boundaries_text


def _session(data: bytes, name: str, threads: int = 1, in_shape: Sequence[int] | None = None,
             out_shape: Sequence[int] | None = None):
    """A session for one model of an export: input ``x``, output ``y``, the manifest's per-sample shapes."""
    return session(data, name, threads, inputs=[INPUT_NAME], outputs=[OUTPUT_NAME], in_shape=in_shape,
                   out_shape=out_shape)


def _segment_path(ends: dict[int, list[int]], a: int, end: int) -> list[tuple[int, int]] | None:
    """A path of segments ``a -> ... -> end`` through ``ends`` (segment starts -> their ends), longest first."""
    if a == end:
        return []
    for b in sorted(ends.get(a, []), reverse=True):
        if b <= end:
            rest = _segment_path(ends, b, end)
            if rest is not None:
                return [(a, b), *rest]
    return None


class OnnxHead:
    """The exported head, run with ONNX Runtime; numpy in, numpy out, thread-safe, no torch.

    A :class:`splitinfer.head.StageBackend`: ``run(x, start, end)`` runs stages ``start..end-1`` through the
    exported segments (``start`` and ``end`` must be cut points of an exported configuration);
    ``exit_logits(b, h)`` runs the exit at boundary ``b``; ``all_finite(h)``. Walk it with
    :func:`splitinfer.head.walk` / :func:`splitinfer.head.run_head` and :meth:`policy`. ``latent(h, boundary)``
    runs the encoder of the learned codec at that boundary; ``plan`` is the plan the export was made for (None
    for an old export loaded without its bundle).
    """

    def __init__(self, manifest: HeadManifest, models: Mapping[str, bytes], threads: int = 1, bundle=None,
                 plan: Plan | None = None):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self.manifest = manifest
        self.threads = threads
        self.plan = plan
        self._bundle = bundle  # a torch Bundle (from_bundle): missing segments are exported on demand
        self._exporter = None
        self._lock = threading.RLock()
        self._segments: dict[tuple[int, int], Any] = {}
        self._exits: dict[int, Any] = {}
        self._encoders: dict[int, Any] = {}
        shapes, classes = manifest.boundaries, [len(manifest.input.labels)]
        for s in manifest.segments:
            self._segments[(s.start, s.end)] = _session(models[s.file], s.file, threads, shapes[s.start],
                                                        shapes[s.end])
        for e in manifest.exits:
            self._exits[e.boundary] = _session(models[e.file], e.file, threads, shapes[e.boundary], classes)
        for c in manifest.learned_codecs:
            self._encoders[c.boundary] = _session(models[c.encoder.file], c.encoder.file, threads,
                                                  shapes[c.boundary], c.latent_shape)
        self._chains: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.thresholds = {e.boundary: e.threshold for e in manifest.exits}
        self.scores = {e.boundary: e.score for e in manifest.exits}
        self.model_bytes = sum(len(models[e.file]) for e in manifest.entries())

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, directory: str | Path, threads: int = 1, bundle_dir: str | Path | None = None) -> OnnxHead:
        """Load an export written by :func:`export_head` (no torch). Every file's sha256 is checked; with
        ``bundle_dir`` the export must come from that bundle's weights, and its ``plan.json`` (which ``plan
        calibrate-exits`` may have rewritten since) gives the plan, the exits' thresholds and scores; without,
        the plan copied into the export does. Raises :class:`BundleError` for a missing, foreign, corrupted or
        mismatched export."""
        manifest = read_manifest(directory)
        models = read_models(directory, manifest)
        plan = bundle_plan(manifest, bundle_dir) if bundle_dir is not None else read_export_plan(directory, manifest)
        if plan is not None:
            manifest = with_plan_exits(manifest, plan)
        return cls(manifest, models, threads, plan=plan)

    @classmethod
    def from_bundle(cls, bundle, threads: int = 1, split: int | None = None, exits: Sequence[int] | None = None,
                    operating_points: bool = True, fallback_tail: bool = True) -> OnnxHead:
        """Export ``bundle``'s head in memory (needs torch; about a second for the default model) and load it.
        Segments of configurations not exported up front (a ``set_operating_point`` outside the plan's
        table) are exported on first use."""
        from edge_agent.onnx_head.export import build, load

        bundle = load(bundle)
        manifest, files = build(bundle, split, exits, operating_points, fallback_tail, seed=0)
        return cls(manifest, files, threads, bundle=bundle, plan=bundle.plan)

    # ------------------------------------------------------------------ properties

    @property
    def split(self) -> int:
        return self.manifest.split

    @property
    def num_stages(self) -> int:
        return self.manifest.num_stages

    @property
    def active_exits(self) -> list[int]:
        return list(self.manifest.active_exits)

    @property
    def exit_boundaries(self) -> list[int]:
        return sorted(self._exits)

    def policy(self) -> ExitPolicy:
        """The exit policy with this head's thresholds and scores (the plan's when it was loaded with one)."""
        return ExitPolicy(dict(self.thresholds), dict(self.scores))

    def supports(self, split: int, exits: Sequence[int]) -> bool:
        """True when the head can run to ``split`` stopping at ``exits`` (and has those exit heads)."""
        if self._bundle is not None:
            return True
        cut = cuts(split, list(exits))
        return all(b in self._exits for b in exits if 0 < b <= split) and all(
            self._chain(a, b) is not None for a, b in zip(cut, cut[1:], strict=False))

    def codec(self, name: str, split: int | None = None) -> NumpyEncoder:
        """The torch-free codec ``name`` (:func:`splitinfer.codec_numpy.numpy_codec`) for boundary tensors of this
        head; a learned codec runs on this head's exported encoder of the learned codec at ``split`` (InvalidInput
        where the export has none)."""
        return numpy_codec(name, self, split)

    # ------------------------------------------------------------------ running

    def _check(self, x: np.ndarray, boundary: int, what: str) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InvalidInput(f"{what} takes a numpy array, got {type(x).__name__}")
        want = self.manifest.boundaries[boundary]
        if x.ndim != len(want) + 1 or list(x.shape[1:]) != want or x.shape[0] < 1:
            raise InvalidInput(f"{what} takes [B, {', '.join(map(str, want))}] at boundary {boundary}, "
                               f"got {list(x.shape)}")
        if x.dtype != np.float32:
            raise InvalidInput(f"{what} takes float32, got {x.dtype}")
        return np.ascontiguousarray(x)

    def _chain(self, start: int, end: int) -> list[tuple[int, int]] | None:
        """Exported segments that run ``start -> end`` back to back (longest first), or None."""
        key = (start, end)
        chain = self._chains.get(key)
        if chain is not None:
            return chain
        with self._lock:
            ends: dict[int, list[int]] = {}
            for a, b in self._segments:
                ends.setdefault(a, []).append(b)
        chain = _segment_path(ends, start, end)
        if chain is not None:
            self._chains[key] = chain
        return chain

    def _exporter_for_bundle(self):
        if self._exporter is None:
            from edge_agent.onnx_head.export import Exporter

            self._exporter = Exporter(self._bundle)
        return self._exporter

    def _export_segment(self, start: int, end: int) -> None:
        with self._lock:
            if (start, end) in self._segments:
                return
            data, _ = self._exporter_for_bundle().segment(start, end)
            shapes = self.manifest.boundaries
            self._segments[(start, end)] = _session(data, f"seg_{start:02d}_{end:02d}", self.threads, shapes[start],
                                                    shapes[end])
            self._chains.clear()

    def run(self, x: np.ndarray, start: int, end: int) -> np.ndarray:
        """Boundary ``start`` tensor in, boundary ``end`` tensor out (``x`` itself when ``start == end``)."""
        if not 0 <= start <= end <= self.num_stages:
            raise InvalidInput(f"stage range {start}..{end} outside 0..{self.num_stages}")
        x = self._check(x, start, "the head")
        chain = self._chain(start, end)
        if chain is None:
            if self._bundle is None:
                raise InvalidInput(f"the exported head has no segments from boundary {start} to {end}; re-export "
                                   "it for this split and exits")
            self._export_segment(start, end)
            chain = self._chain(start, end)
        for key in chain:
            x = self._segments[key].run(None, {INPUT_NAME: x})[0]
        return x

    def exit_logits(self, boundary: int, h: np.ndarray) -> np.ndarray:
        """Logits ``[B, classes]`` (float32) of the exit head at ``boundary`` for the boundary tensor ``h``."""
        sess = self._exits.get(boundary)
        if sess is None:
            if self._bundle is None or boundary not in self._bundle.exits:
                raise InvalidInput(f"the exported head has no exit at boundary {boundary}")
            with self._lock:
                data, _ = self._exporter_for_bundle().exit(boundary)
                sess = self._exits[boundary] = _session(data, f"exit_{boundary:02d}", self.threads)
        return sess.run(None, {INPUT_NAME: self._check(h, boundary, "an exit head")})[0]

    def all_finite(self, h: np.ndarray) -> bool:
        """True when ``h`` holds no NaN or infinite value."""
        return all_finite(h)

    @property
    def learned_boundaries(self) -> list[int]:
        """Boundaries with a learned codec's exported encoder, ascending."""
        return sorted(self._encoders)

    def latent(self, h: np.ndarray, boundary: int | None = None) -> np.ndarray:
        """The output of the encoder of the learned codec at ``boundary`` (default: the export's only one) in
        quantizer units (round and clip to ``0..2**bits-1`` for the symbols) for features ``h`` there."""
        if not self._encoders:
            raise InvalidInput("this head carries no learned codec encoder")
        if boundary is None:
            if len(self._encoders) > 1:
                raise InvalidInput(f"this head carries learned codecs at {boundaries_text(self._encoders)}: "
                                   "name the boundary")
            boundary = next(iter(self._encoders))
        sess = self._encoders.get(boundary)
        if sess is None:
            raise InvalidInput(f"this head carries no learned codec encoder at boundary {boundary} (it has "
                               f"{boundaries_text(self._encoders)})")
        return sess.run(None, {INPUT_NAME: self._check(h, boundary, "the encoder")})[0]

    def torch_view(self) -> TorchHeadView:
        """This head on torch tensors, shaped like the staged model the runtime uses (needs torch)."""
        return TorchHeadView(self)


def numpy_codec(name: str, head: OnnxHead | None = None, split: int | None = None) -> NumpyEncoder:
    """The torch-free codec ``name`` for boundary-``split`` tensors of ``head``:
    :func:`splitinfer.codec_numpy.numpy_codec`, with a learned codec built on the head's exported encoder of the
    learned codec at ``split`` (each works at its own boundary only; with ``split`` None, the head's only one).
    InvalidInput for an unknown codec or one the head cannot run there."""
    if name != LearnedEncoder.name:
        return _numpy_codec(name)
    have = [] if head is None else [c for c in head.manifest.learned_codecs if c.name == name]
    if not have:
        raise InvalidInput("the exported head carries no learned codec")
    at = [c.boundary for c in have]
    if split is None and len(have) > 1:
        raise InvalidInput(f"the learned codec works at {boundaries_text(at)}: name the split")
    c = have[0] if split is None else next((c for c in have if c.boundary == split), None)
    if c is None:
        raise InvalidInput(f"the learned codec works at {boundaries_text(at)}, not {split}")
    return _numpy_codec(name, latent=functools.partial(head.latent, boundary=c.boundary), latent_shape=c.latent_shape,
                        bits=c.bits, tables=c.tables, coder=c.coder or "ans")


class _TorchExit:
    def __init__(self, head: OnnxHead, boundary: int):
        self.head, self.boundary = head, boundary

    def __call__(self, h):
        import torch

        return torch.from_numpy(self.head.exit_logits(self.boundary, h.detach().contiguous().numpy()))


class TorchHeadView:
    """Adapter for ``EdgeRuntime``: ``run(x, start, end)`` like :class:`~splitinfer.staged.StagedModel` and
    ``exits[b](h)`` like the bundle's exit heads, on torch tensors (copies in, zero-copy out)."""

    def __init__(self, head: OnnxHead):
        self.head = head
        self.num_stages = head.num_stages
        self.exits = {b: _TorchExit(head, b) for b in head.exit_boundaries}

    def run(self, x, start: int, end: int):
        import torch

        return torch.from_numpy(self.head.run(x.detach().contiguous().numpy(), start, end))

    def latent(self, h, boundary: int | None = None):
        """:meth:`OnnxHead.latent` on a torch tensor."""
        import torch

        return torch.from_numpy(self.head.latent(h.detach().contiguous().numpy(), boundary))
