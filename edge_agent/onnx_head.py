"""ONNX Runtime backend for the edge head: the head's stages, its exit heads and the learned codec's encoder as
ONNX models, run with ``onnxruntime`` (1 thread, sequential), so a device can run the edge path without torch.

What is exported (:func:`export_head`, or :meth:`OnnxHead.from_bundle` in memory at start-up):

* one **segment** model per stretch of stages between two cut points ``a -> b`` (input ``x``: boundary ``a``,
  output ``y``: boundary ``b``). The cut points of a configuration ``(split, exits)`` are ``0``, every exit
  boundary the runtime evaluates (``0 < b <= split``) and the split, exactly where ``EdgeRuntime._infer`` stops
  to score an exit; with ``fallback_tail`` also ``split -> num_stages`` (the degraded answer on the device
  when the server is down and no exit ran). The plan's configuration and, by default, every operating point's
  are exported; segment files are shared between configurations.
* one **exit** model per exit boundary (input ``x``: the boundary tensor, output ``y``: logits).
* the learned codec's **encoder** when the bundle carries one (the bottleneck encoder with batch norm and the
  quantizer's affine map folded in, i.e. the very module :class:`splitinfer.bottleneck.LearnedCodec` runs;
  output: the latent in quantizer units, rounded and clipped to give the symbols).

Every model has a dynamic batch dimension and is checked at export against torch on a seeded batch of
realistic inputs (max abs diff <= ``1e-4 * max(1, max |reference|)``, else :class:`HeadExportError`).

On disk (``out_dir``)::

    onnx_head.json      manifest (format ``splitinfer-onnx-head``, version 1): the source bundle's weight hashes,
                        input spec (shape, mean, std, labels), boundaries, exits (threshold, score), the
                        configurations covered, the codec (and for the learned codec: bits, latent shape, coder,
                        probability tables), and per file: sha256, bytes, export check figure
    seg_AA_BB.onnx      stages AA..BB-1
    exit_BB.onnx        the exit head at boundary BB
    encoder_BB.onnx     the learned codec's encoder at boundary BB

Running (:class:`OnnxHead`, numpy in and out, never imports torch)::

    head = OnnxHead.load("runs/bundle-onnx")                 # or OnnxHead.from_bundle(bundle) (needs torch)
    for step in head.iter_head(x):                           # x: float32 [1, C, H, W], normalised
        if step.logits is not None and score(step.logits) >= threshold: ... answer, stop
    h = step.tensor                                          # the split tensor: encode and offload

Inside the torch agent, :meth:`OnnxHead.torch_view` gives an object with the staged model's ``run(x, start,
end)`` and a mapping ``exits[b](h)`` on torch tensors, so ``EdgeRuntime`` swaps backends in a few lines.

The torch-free request path (:class:`NumpyEdge`: normalisation, head, exit scores, uint8-affine/float32 encode in
numpy, the learned codec's encoder in ONNX Runtime + :class:`splitinfer.entropy.SymbolCoder`) produces the same
payload bytes as the torch codecs given the same boundary tensor. ``python -m edge_agent.onnx_head run`` is that
path as a command; it fails if anything imported torch. See docs/onnx-head.md for figures and limits.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import io
import json
import math
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from splitinfer.errors import BundleError, ConfigError, InvalidInput

FORMAT = "splitinfer-onnx-head"
VERSION = 1
MANIFEST_FILE = "onnx_head.json"
OPSET = 17
RTOL = 1e-4
"""Export check: max abs diff vs torch must be <= RTOL * max(1, max |reference|)."""
CHECK_BATCH = 3
INPUT_NAME = "x"
OUTPUT_NAME = "y"
GENERIC_CODECS = ("float32", "uint8-affine")
UINT8_MIN_VALUES_PER_CHANNEL = 16  # splitinfer.codec.UInt8AffineCodec.min_values_per_channel


class HeadExportError(BundleError):
    """The head (or an exit, or the encoder) cannot be exported, or the export does not reproduce torch."""


# ---------------------------------------------------------------------------------------------- manifest


class FileEntry(BaseModel):
    file: str
    sha256: str
    bytes: int
    max_abs_diff: float = Field(description="export check: max |ORT - torch| on a seeded batch")


class SegmentEntry(FileEntry):
    start: int
    end: int


class ExitEntry(FileEntry):
    boundary: int
    threshold: float
    score: str = "max_softmax"


class CodecEntry(BaseModel):
    """The planned codec; for the learned codec also what the torch-free path needs to entropy-code."""

    name: str
    boundary: int | None = None
    bits: int | None = None
    coder: str | None = None
    latent_shape: list[int] | None = None
    tables: list[list[float]] | None = None
    encoder: FileEntry | None = None


class HeadConfig(BaseModel):
    """One (split, codec, exits) the export covers; ``exits`` are the boundaries the runtime evaluates."""

    split: int
    codec: str
    exits: list[int]


class InputInfo(BaseModel):
    shape: list[int]
    mean: list[float]
    std: list[float]
    labels: list[str]


class HeadManifest(BaseModel):
    """``onnx_head.json``."""

    format: str = FORMAT
    version: int = VERSION
    created: str
    opset: int = OPSET
    exporter: dict[str, str] = Field(default_factory=dict, description="torch / onnx / onnxruntime versions")
    model: str
    num_stages: int
    boundaries: list[list[int]] = Field(description="per-sample shape of every boundary tensor")
    input: InputInfo
    bundle_files: dict[str, str] = Field(description="sha256 of the source bundle's weight files (plan.files)")
    split: int
    active_exits: list[int] = Field(description="exits evaluated at the planned split")
    codec: CodecEntry
    configs: list[HeadConfig]
    segments: list[SegmentEntry]
    exits: list[ExitEntry]
    fallback_tail: bool = True

    def entries(self) -> list[FileEntry]:
        out: list[FileEntry] = [*self.segments, *self.exits]
        if self.codec.encoder is not None:
            out.append(self.codec.encoder)
        return out


def runtime_head_exits(plan_exits: Mapping[int, float], split: int, exits: Sequence[int] | None) -> list[int]:
    """The exits ``EdgeRuntime`` evaluates at ``split``: the enabled ones (all when ``exits`` is None) in
    ``1..split`` that have a head, in order."""
    enabled = sorted(plan_exits) if exits is None else sorted(exits)
    return [b for b in enabled if 0 < b <= split and b in plan_exits]


def _cuts(split: int, exits: Sequence[int]) -> list[int]:
    return sorted({0, split, *(b for b in exits if 0 < b < split)})


# ---------------------------------------------------------------------------------------------- export (torch)


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "onnx", "onnxruntime"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "?"))
    return out


def _export_bytes(module, example) -> bytes:
    """``module`` as ONNX bytes (TorchScript-based exporter, opset 17, dynamic batch, input x / output y)."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant for a bundle
        torch.onnx.export(module, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return buf.getvalue()


def _check(name: str, data: bytes, module, x) -> float:
    """Run the exported bytes in ORT and compare with ``module(x)``; returns the max abs diff."""
    import torch

    try:
        sess = _session(data, name, threads=1)
        got = sess.run(None, {INPUT_NAME: x.numpy()})[0]
    except BundleError as exc:
        raise HeadExportError(f"exported {name} does not load in ONNX Runtime: {exc}") from exc
    with torch.inference_mode():
        ref = module(x.clone()).numpy()  # stages may work in place on their input
    if got.shape != ref.shape:
        raise HeadExportError(f"exported {name} returns shape {list(got.shape)}, torch {list(ref.shape)}")
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    tol = RTOL * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
    if not np.isfinite(got).all() or diff > tol:
        raise HeadExportError(f"exported {name} disagrees with torch: max abs diff {diff:.3g} > {tol:.3g}")
    return diff


def _load(bundle):
    from splitinfer.bundle import Bundle, load_bundle

    if isinstance(bundle, Bundle):
        return bundle
    return load_bundle(bundle)


def _bundle_configs(bundle, split: int | None, exits: Sequence[int] | None,
                    operating_points: bool) -> tuple[HeadConfig, list[HeadConfig]]:
    plan = bundle.plan
    certified = {e.boundary: e.threshold for e in plan.exits if e.boundary in bundle.exits}
    n = bundle.num_stages
    split = plan.split if split is None else int(split)
    if not 0 <= split <= n:
        raise HeadExportError(f"split {split} outside 0..{n}")
    if exits is None and split == plan.split:
        exits = plan.active_exits
    if exits is not None and not set(exits) <= set(certified):
        raise HeadExportError(f"exits {sorted(set(exits) - set(certified))} are not in the bundle")
    codec = plan.codec.name  # as EdgeRuntime.set_operating_point: the plan's codec where it applies
    if codec not in GENERIC_CODECS and (bundle.learned_codec is None or bundle.learned_codec.boundary != split):
        codec = "uint8-affine"
    main = HeadConfig(split=split, codec=codec, exits=runtime_head_exits(certified, split, exits))
    configs = [main]
    if operating_points:
        for p in plan.operating_points:
            c = HeadConfig(split=p.split, codec=p.codec, exits=runtime_head_exits(certified, p.split, p.exits))
            if c not in configs:
                configs.append(c)
    return main, configs


class _Exporter:
    """Exports and checks the pieces of one bundle (torch needed); keeps the seeded check inputs."""

    def __init__(self, bundle, seed: int = 0):
        import torch

        if bundle.plan.head.kind != "fp32":
            raise HeadExportError(f"the plan runs a {bundle.plan.head.kind} head; only fp32 heads export to ONNX "
                                  "(use the torch backend for an int8 head)")
        self.bundle = bundle
        staged = bundle.staged
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(CHECK_BATCH, *bundle.plan.input.shape, generator=gen)
        self.inputs = [x]
        with torch.inference_mode():
            h = x
            for stage in staged.stages:
                h = stage(h.clone())
                self.inputs.append(h.clone())

    def segment(self, a: int, b: int) -> tuple[bytes, float]:
        from torch import nn

        module = nn.Sequential(*self.bundle.staged.stages[a:b]).eval()
        try:
            data = _export_bytes(module, self.inputs[a][:1].clone())
        except Exception as exc:  # an op the exporter cannot express
            raise HeadExportError(f"cannot export stages {a}..{b - 1}: {type(exc).__name__}: {exc}") from exc
        return data, _check(f"stages {a}..{b - 1}", data, module, self.inputs[a])

    def exit(self, b: int) -> tuple[bytes, float]:
        module = self.bundle.exits[b].eval()
        try:
            data = _export_bytes(module, self.inputs[b][:1].clone())
        except Exception as exc:
            raise HeadExportError(f"cannot export the exit at boundary {b}: {type(exc).__name__}: {exc}") from exc
        return data, _check(f"exit {b}", data, module, self.inputs[b])

    def encoder(self) -> tuple[bytes, float]:
        lc = self.bundle.learned_codec
        module = lc._encoder  # the fused, quantizer-folded encoder LearnedCodec runs (same export settings)
        try:
            data = _export_bytes(module, self.inputs[lc.boundary][:1].clone())
        except Exception as exc:
            raise HeadExportError(f"cannot export the learned codec's encoder: {type(exc).__name__}: {exc}") from exc
        return data, _check("encoder", data, module, self.inputs[lc.boundary])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build(bundle, split: int | None, exits: Sequence[int] | None, operating_points: bool, fallback_tail: bool,
           seed: int) -> tuple[HeadManifest, dict[str, bytes]]:
    """Export every piece the configurations need; returns the manifest and ``file name -> ONNX bytes``."""
    plan = bundle.plan
    n = bundle.num_stages
    main, configs = _bundle_configs(bundle, split, exits, operating_points)
    ex = _Exporter(bundle, seed)
    files: dict[str, bytes] = {}
    pairs: set[tuple[int, int]] = set()
    for c in configs:
        cuts = _cuts(c.split, c.exits)
        pairs.update(zip(cuts, cuts[1:], strict=False))
        if fallback_tail and c.split < n:
            pairs.add((c.split, n))
    segments = []
    for a, b in sorted(pairs):
        data, diff = ex.segment(a, b)
        name = f"seg_{a:02d}_{b:02d}.onnx"
        files[name] = data
        segments.append(SegmentEntry(file=name, sha256=_sha(data), bytes=len(data), max_abs_diff=diff, start=a, end=b))
    spec = {e.boundary: e for e in plan.exits}
    exit_entries = []
    for b in sorted(bundle.exits):  # every exit (a few tens of kB each), so any operating point finds its exits
        data, diff = ex.exit(b)
        name = f"exit_{b:02d}.onnx"
        files[name] = data
        exit_entries.append(ExitEntry(file=name, sha256=_sha(data), bytes=len(data), max_abs_diff=diff, boundary=b,
                                      threshold=spec[b].threshold, score=spec[b].score))
    codec = CodecEntry(name=main.codec)
    lc = bundle.learned_codec
    if lc is not None:
        data, diff = ex.encoder()
        name = f"encoder_{lc.boundary:02d}.onnx"
        files[name] = data
        codec = CodecEntry(name=main.codec, boundary=lc.boundary, bits=lc.cfg.bits, coder=lc.cfg.coder,
                           latent_shape=list(lc.cfg.latent_shape),
                           tables=[[float(v) for v in row] for row in lc.bottleneck.tables.numpy()],
                           encoder=FileEntry(file=name, sha256=_sha(data), bytes=len(data), max_abs_diff=diff))
    manifest = HeadManifest(
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), exporter=_versions(), model=plan.model.name,
        num_stages=n, boundaries=[list(b.shape) for b in plan.boundaries],
        input=InputInfo(shape=list(plan.input.shape), mean=list(plan.input.mean), std=list(plan.input.std),
                        labels=list(plan.input.labels)),
        bundle_files=dict(plan.files), split=main.split, active_exits=main.exits, codec=codec, configs=configs,
        segments=segments, exits=exit_entries, fallback_tail=fallback_tail)
    return manifest, files


def export_head(bundle, split: int | None = None, exits: Sequence[int] | None = None,
                out_dir: str | Path = "onnx-head", *, operating_points: bool = True, fallback_tail: bool = True,
                seed: int = 0) -> HeadManifest:
    """Export the edge head of ``bundle`` (a :class:`~splitinfer.bundle.Bundle` or a bundle directory) to
    ``out_dir`` as ONNX models plus ``onnx_head.json``, and return the manifest. Needs torch.

    ``split`` defaults to the plan's split; ``exits`` (the exits enabled, as in
    :meth:`EdgeRuntime.set_operating_point`) to the plan's ``active_exits`` at the planned split, else every
    exit. With ``operating_points`` every operating point of the plan is covered too, so an agent can switch.
    ``fallback_tail`` adds ``split -> num_stages`` (the on-device answer when the server is down).
    Raises :class:`HeadExportError` when a piece does not export or does not match torch.
    """
    bundle = _load(bundle)
    manifest, files = _build(bundle, split, exits, operating_points, fallback_tail, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # the manifest goes last: its presence marks a complete export
    for stale in [*out.glob("seg_*.onnx"), *out.glob("exit_*.onnx"), *out.glob("encoder_*.onnx")]:
        if stale.name not in files:
            stale.unlink()
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------- runtime (no torch)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError("the onnx head backend needs onnxruntime (pip install onnxruntime)") from exc
    return ort


def _session(data: bytes, name: str, threads: int = 1, in_shape: Sequence[int] | None = None,
             out_shape: Sequence[int] | None = None):
    """An ONNX Runtime CPU session for model bytes: ``threads`` intra-op threads, sequential execution.
    Loading from bytes (not a path) also keeps ORT from following external-data references. With
    ``in_shape``/``out_shape`` (per sample) the model's declared input and output shapes must match."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # InvalidProtobuf, Fail, InvalidGraph, ...: a corrupted or foreign file
        raise BundleError(f"{name} is not a loadable ONNX model (corrupted?): {type(exc).__name__}: {exc}") from None
    ins, outs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    if ins != [INPUT_NAME] or outs != [OUTPUT_NAME]:
        raise BundleError(f"{name} has inputs {ins} and outputs {outs}; an exported head model has "
                          f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")
    for what, arg, want in (("input", sess.get_inputs()[0], in_shape), ("output", sess.get_outputs()[0], out_shape)):
        if want is not None and list(arg.shape[1:]) != list(want):
            raise BundleError(f"{name} has {what} shape {list(arg.shape)}; {MANIFEST_FILE} expects "
                              f"[batch, {', '.join(map(str, want))}]")
    return sess


def _walk(ends: dict[int, list[int]], a: int, end: int) -> list[tuple[int, int]] | None:
    """A path of segments ``a -> ... -> end`` through ``ends`` (segment starts -> their ends), longest first."""
    if a == end:
        return []
    for b in sorted(ends.get(a, []), reverse=True):
        if b <= end:
            rest = _walk(ends, b, end)
            if rest is not None:
                return [(a, b), *rest]
    return None


@dataclass
class HeadStep:
    """One boundary the head stopped at: its tensor and, when an exit is evaluated there, the exit's logits."""

    boundary: int
    tensor: np.ndarray
    logits: np.ndarray | None = None
    head_s: float = 0.0
    """Time spent in the segment that produced ``tensor`` (seconds)."""
    exit_s: float = 0.0
    """Time spent in the exit head (seconds, 0 without one)."""


class OnnxHead:
    """The exported head, run with ONNX Runtime; numpy in, numpy out, thread-safe, no torch.

    ``run(x, start, end)`` runs stages ``start..end-1`` through the exported segments (``start`` and ``end``
    must be cut points of an exported configuration); ``exit_logits(b, h)`` runs the exit at boundary ``b``;
    ``latent(h)`` the learned codec's encoder; ``iter_head(x)`` the whole head, boundary by boundary.
    """

    def __init__(self, manifest: HeadManifest, models: Mapping[str, bytes], threads: int = 1, bundle=None):
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self.manifest = manifest
        self.threads = threads
        self._bundle = bundle  # a torch Bundle (from_bundle): missing segments are exported on demand
        self._exporter: _Exporter | None = None
        self._lock = threading.RLock()
        self._segments: dict[tuple[int, int], Any] = {}
        self._exits: dict[int, Any] = {}
        self._encoder = None
        shapes, classes = manifest.boundaries, [len(manifest.input.labels)]
        for s in manifest.segments:
            self._segments[(s.start, s.end)] = _session(models[s.file], s.file, threads, shapes[s.start],
                                                        shapes[s.end])
        for e in manifest.exits:
            self._exits[e.boundary] = _session(models[e.file], e.file, threads, shapes[e.boundary], classes)
        c = manifest.codec
        if c.encoder is not None:
            self._encoder = _session(models[c.encoder.file], c.encoder.file, threads, shapes[c.boundary],
                                     c.latent_shape)
        self._chains: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.thresholds = {e.boundary: e.threshold for e in manifest.exits}
        self.scores = {e.boundary: e.score for e in manifest.exits}
        self.model_bytes = sum(len(models[e.file]) for e in manifest.entries())

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, directory: str | Path, threads: int = 1, bundle_dir: str | Path | None = None) -> OnnxHead:
        """Load an export written by :func:`export_head` (no torch). Every file's sha256 is checked; with
        ``bundle_dir`` the export must come from that bundle's weights, and the exits' thresholds and scores
        are taken from its ``plan.json`` (which ``plan calibrate-exits`` may have rewritten since).
        Raises :class:`BundleError` for a missing, foreign, corrupted or mismatched export."""
        d = Path(directory)
        path = d / MANIFEST_FILE
        if not path.is_file():
            raise BundleError(f"no {MANIFEST_FILE} in {d}; export the head first (python -m edge_agent.onnx_head "
                              "export --bundle DIR --out DIR)")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path} is not valid JSON (corrupted?): {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BundleError(f"{path} is not an exported splitinfer head (format {raw.get('format')!r})"
                              if isinstance(raw, dict) else f"{path} must hold a JSON object")
        if raw.get("version") != VERSION:
            raise BundleError(f"{path} has version {raw.get('version')!r}; this build reads version {VERSION}")
        try:
            manifest = HeadManifest.model_validate(raw)
        except ValidationError as exc:
            raise BundleError(f"{path} does not match the manifest schema: {exc}") from exc
        models = {}
        for entry in manifest.entries():
            fp = d / entry.file
            if Path(entry.file).name != entry.file:
                raise BundleError(f"{MANIFEST_FILE} names file {entry.file!r} outside {d}")
            if not fp.is_file():
                raise BundleError(f"exported head {d} is missing {entry.file}")
            data = fp.read_bytes()
            if _sha(data) != entry.sha256:
                raise BundleError(f"{entry.file} is corrupted: sha256 does not match {MANIFEST_FILE}")
            models[entry.file] = data
        if bundle_dir is not None:
            manifest = _against_plan(manifest, Path(bundle_dir))
        return cls(manifest, models, threads)

    @classmethod
    def from_bundle(cls, bundle, threads: int = 1, split: int | None = None, exits: Sequence[int] | None = None,
                    operating_points: bool = True, fallback_tail: bool = True) -> OnnxHead:
        """Export ``bundle``'s head in memory (needs torch; about a second for the default model) and load it.
        Segments of configurations not exported up front (a ``set_operating_point`` outside the plan's
        table) are exported on first use."""
        bundle = _load(bundle)
        manifest, files = _build(bundle, split, exits, operating_points, fallback_tail, seed=0)
        return cls(manifest, files, threads, bundle=bundle)

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

    def supports(self, split: int, exits: Sequence[int]) -> bool:
        """True when the head can run to ``split`` stopping at ``exits`` (and has those exit heads)."""
        if self._bundle is not None:
            return True
        cuts = _cuts(split, exits)
        return all(b in self._exits for b in exits if 0 < b <= split) and all(
            self._chain(a, b) is not None for a, b in zip(cuts, cuts[1:], strict=False))

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
        chain = _walk(ends, start, end)
        if chain is not None:
            self._chains[key] = chain
        return chain

    def _export_segment(self, start: int, end: int) -> None:
        with self._lock:
            if (start, end) in self._segments:
                return
            if self._exporter is None:
                self._exporter = _Exporter(self._bundle)
            data, _ = self._exporter.segment(start, end)
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
        """Logits ``[B, classes]`` of the exit head at ``boundary`` for the boundary tensor ``h``."""
        sess = self._exits.get(boundary)
        if sess is None:
            if self._bundle is None or boundary not in self._bundle.exits:
                raise InvalidInput(f"the exported head has no exit at boundary {boundary}")
            with self._lock:
                if self._exporter is None:
                    self._exporter = _Exporter(self._bundle)
                data, _ = self._exporter.exit(boundary)
                sess = self._exits[boundary] = _session(data, f"exit_{boundary:02d}", self.threads)
        return sess.run(None, {INPUT_NAME: self._check(h, boundary, "an exit head")})[0]

    def latent(self, h: np.ndarray) -> np.ndarray:
        """The learned codec's encoder output in quantizer units (round and clip to ``0..2**bits-1`` for the
        symbols) for features ``h`` at the codec's boundary."""
        if self._encoder is None:
            raise InvalidInput("this head carries no learned codec encoder")
        return self._encoder.run(None, {INPUT_NAME: self._check(h, self.manifest.codec.boundary, "the encoder")})[0]

    def iter_head(self, x: np.ndarray, split: int | None = None,
                  exits: Sequence[int] | None = None) -> Iterator[HeadStep]:
        """Run the head to ``split`` (default: the planned one), yielding a :class:`HeadStep` at every exit
        boundary (with the exit's logits) and finally at the split (with logits when an exit sits there). The
        head is lazy: stop iterating when an exit is confident and the later segments never run.
        ``exits`` (default: the planned active exits) are the boundaries to evaluate."""
        split = self.split if split is None else split
        exits = [b for b in sorted(self.active_exits if exits is None else exits) if 0 < b <= split]
        h, prev = x, 0
        for b in [*exits, *([split] if split not in exits else [])]:
            t = time.perf_counter()
            h = self.run(h, prev, b)
            head_s = time.perf_counter() - t
            prev = b
            logits, exit_s = None, 0.0
            if b in exits:
                t = time.perf_counter()
                logits = self.exit_logits(b, h)
                exit_s = time.perf_counter() - t
            yield HeadStep(b, h, logits, head_s, exit_s)

    def torch_view(self) -> TorchHeadView:
        """This head on torch tensors, shaped like the staged model the runtime uses (needs torch)."""
        return TorchHeadView(self)


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

    def latent(self, h):
        import torch

        return torch.from_numpy(self.head.latent(h.detach().contiguous().numpy()))


def _against_plan(manifest: HeadManifest, bundle_dir: Path) -> HeadManifest:
    """Check the export against a bundle's plan.json (read as JSON: no torch) and take its exit thresholds."""
    plan_path = bundle_dir / "plan.json"
    try:
        plan = json.loads(plan_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {plan_path}: {exc}") from exc
    files = plan.get("files", {}) if isinstance(plan, dict) else {}
    if files != manifest.bundle_files:
        raise BundleError(f"the exported head was made from other weights than bundle {bundle_dir} (file hashes "
                          "differ); export it again")
    spec = {int(e["boundary"]): e for e in plan.get("exits", [])}
    exits = [e.model_copy(update={"threshold": float(spec[e.boundary]["threshold"]),
                                  "score": spec[e.boundary].get("score", "max_softmax")})
             if e.boundary in spec else e for e in manifest.exits]
    return manifest.model_copy(update={"exits": exits})


# ---------------------------------------------------------------------------------------------- numpy codecs


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` -> float32 ``[N, C, H, W]``, bit for bit what
    :func:`splitinfer.data.to_model_input` computes."""
    x = np.ascontiguousarray(images).astype(np.float32) / np.float32(255.0)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def encode_float32(h: np.ndarray) -> tuple[bytes, dict]:
    """:class:`splitinfer.codec.Float32Codec` in numpy."""
    arr = np.ascontiguousarray(h, dtype=np.float32)
    return arr.astype("<f4", copy=False).tobytes(), {"shape": ",".join(str(int(s)) for s in arr.shape)}


def encode_uint8_affine(h: np.ndarray) -> tuple[bytes, dict]:
    """:class:`splitinfer.codec.UInt8AffineCodec` in numpy: the same float32 arithmetic, so the same bytes."""
    x = np.asarray(h, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput("cannot encode features holding NaN or infinite values")
    if x.ndim < 2:
        raise InvalidInput(f"uint8-affine needs a tensor with a channel dimension, got shape {list(x.shape)}")
    c = x.shape[1]
    per_channel = int(np.prod(x.shape[2:], dtype=np.int64))
    granularity = "channel" if per_channel >= UINT8_MIN_VALUES_PER_CHANNEL else "tensor"
    groups = c if granularity == "channel" else 1
    flat = np.swapaxes(x, 0, 1).reshape(groups, -1)
    lo = flat.min(axis=1)
    hi = flat.max(axis=1)
    scale = (hi - lo) / np.float32(255.0)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    view = [1, groups] + [1] * (x.ndim - 2)
    q = np.clip(np.rint((x - lo.reshape(view)) / scale.reshape(view)), 0, 255).astype(np.uint8)
    payload = b"".join([lo.astype("<f4").tobytes(), scale.astype("<f4").tobytes(), np.ascontiguousarray(q).tobytes()])
    return payload, {"shape": ",".join(str(int(s)) for s in x.shape), "granularity": granularity}


class LearnedEncoder:
    """:meth:`splitinfer.bottleneck.LearnedCodec.encode` without torch: the exported encoder (ONNX Runtime),
    round and clip to symbols, then :class:`splitinfer.entropy.SymbolCoder` (numpy + constriction)."""

    def __init__(self, head: OnnxHead):
        from splitinfer.entropy import SymbolCoder

        c = head.manifest.codec
        if c.encoder is None or c.tables is None or c.bits is None or c.latent_shape is None:
            raise BundleError("the exported head carries no learned codec")
        self.head = head
        self.levels = 1 << c.bits
        self.coder = SymbolCoder(c.latent_shape, c.bits, np.asarray(c.tables, dtype=np.float32), c.coder or "ans")

    def encode(self, h: np.ndarray) -> tuple[bytes, dict]:
        u = self.head.latent(np.asarray(h, dtype=np.float32))
        if not math.isfinite(float(u.sum())):
            raise InvalidInput("cannot encode features holding NaN or infinite values")
        sym = np.rint(np.clip(u, 0, self.levels - 1)).astype(np.uint8)
        return self.coder.encode(sym), {"v": 1}


def scores(logits: np.ndarray, score: str = "max_softmax") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, max softmax, argmax) per row: :func:`splitinfer.calibration.confidence` in numpy."""
    z = logits.astype(np.float32)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    pred = p.argmax(axis=1)
    top = p.max(axis=1)
    if score == "max_softmax":
        s = top
    elif score == "margin":
        two = np.sort(p, axis=1)[:, -2:]
        s = two[:, 1] - two[:, 0]
    elif score == "neg_entropy":
        s = (p * np.log(np.maximum(p, np.float32(1e-12)))).sum(axis=1)
    else:
        raise ValueError(f"unknown confidence score {score!r}")
    return s, top, pred


# ---------------------------------------------------------------------------------------------- request path


@dataclass
class EdgeDecision:
    """What the edge does with one request: answer from an exit / the full model, or offload ``payload``."""

    decided_by: int | str
    """Exit boundary, ``num_stages`` (edge-only plan), or ``"cloud"`` (send ``payload`` with ``meta``)."""
    label: int | None = None
    confidence: float | None = None
    split: int = 0
    codec: str | None = None
    payload: bytes | None = None
    meta: dict = field(default_factory=dict)
    exit_scores: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"decided_by": self.decided_by, "label": self.label, "confidence": self.confidence, "split": self.split,
             "codec": self.codec, "meta": self.meta, "exit_scores": {str(k): v for k, v in self.exit_scores.items()}}
        d["payload_b64"] = None if self.payload is None else base64.b64encode(self.payload).decode()
        return d


class NumpyEdge:
    """The edge request path without torch: head and exits (ONNX Runtime), the runtime's exit policy (score >=
    threshold answers; the first confident exit wins), then the codec at the split (numpy; the learned codec's
    encoder in ONNX Runtime). Transport, drift, adaptation and metrics are not part of it."""

    def __init__(self, head: OnnxHead, split: int | None = None, exits: Sequence[int] | None = None,
                 codec: str | None = None):
        """``split`` defaults to the planned one; ``exits`` and ``codec`` to those of the exported configuration
        at that split (else the planned exits before it and uint8-affine)."""
        self.head = head
        m = head.manifest
        self.split = m.split if split is None else split
        known = next((c for c in m.configs if c.split == self.split), None)  # an exported operating point
        default_exits = known.exits if known is not None else m.active_exits
        self.exits = [b for b in sorted(default_exits if exits is None else exits) if 0 < b <= self.split]
        default_codec = known.codec if known is not None else "uint8-affine"
        self.codec = default_codec if codec is None else codec
        if self.split < m.num_stages:
            if self.codec in ("bottleneck",):
                if m.codec.boundary != self.split:
                    raise InvalidInput(f"the learned codec works at boundary {m.codec.boundary}, not {self.split}")
                self._encode = LearnedEncoder(head).encode
            elif self.codec == "uint8-affine":
                self._encode = encode_uint8_affine
            elif self.codec == "float32":
                self._encode = encode_float32
            else:
                raise InvalidInput(f"unknown codec {self.codec!r}")

    def normalise(self, images: np.ndarray) -> np.ndarray:
        i = self.head.manifest.input
        return normalise(images, i.mean, i.std)

    def infer(self, x: np.ndarray) -> EdgeDecision:
        """One normalised input ``[1, C, H, W]`` -> the decision (and the payload when offloading)."""
        scored: dict[int, float] = {}
        h = x
        for step in self.head.iter_head(x, self.split, self.exits):
            h = step.tensor
            if not np.isfinite(h).all():
                raise InvalidInput(f"the input drives the model to non-finite values at boundary {step.boundary}")
            if step.logits is not None:
                s, conf, pred = scores(step.logits, self.head.scores.get(step.boundary, "max_softmax"))
                scored[step.boundary] = float(s[0])
                if s[0] >= self.head.thresholds[step.boundary]:
                    return EdgeDecision(step.boundary, int(pred[0]), float(conf[0]), self.split, exit_scores=scored)
        if self.split == self.head.num_stages:
            _, conf, pred = scores(h)
            return EdgeDecision(self.split, int(pred[0]), float(conf[0]), self.split, exit_scores=scored)
        payload, meta = self._encode(h)
        return EdgeDecision("cloud", None, None, self.split, self.codec, payload, meta, scored)


# ---------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m edge_agent.onnx_head export --bundle DIR --out DIR`` (needs torch) and
    ``python -m edge_agent.onnx_head run --head DIR --images FILE.npy`` (torch-free: JSON lines of decisions with
    base64 payloads; exits with status 3 if torch was imported along the way)."""
    ap = argparse.ArgumentParser(prog="python -m edge_agent.onnx_head", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="export a bundle's head to ONNX (needs torch)")
    ex.add_argument("--bundle", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--split", type=int)
    ex.add_argument("--exits", help="comma-separated exit boundaries (default: the plan's)")
    ex.add_argument("--no-operating-points", action="store_true")
    run = sub.add_parser("run", help="torch-free request path over uint8 images [N, H, W(, C)] in a .npy")
    run.add_argument("--head", required=True)
    run.add_argument("--images", required=True)
    run.add_argument("--bundle", help="check the export against this bundle and take its thresholds")
    run.add_argument("--split", type=int)
    run.add_argument("--exits", help="comma-separated exit boundaries (default: the export's)")
    run.add_argument("--out", help="JSON lines file (default: stdout)")
    args = ap.parse_args(argv)
    exits = None if not args.exits else [int(b) for b in args.exits.split(",")]
    if args.cmd == "export":
        m = export_head(args.bundle, args.split, exits, args.out, operating_points=not args.no_operating_points)
        print(json.dumps({"out": args.out, "split": m.split, "exits": m.active_exits, "codec": m.codec.name,
                          "files": len(m.entries()), "bytes": sum(e.bytes for e in m.entries()),
                          "max_abs_diff": max(e.max_abs_diff for e in m.entries())}))
        return 0
    head = OnnxHead.load(args.head, bundle_dir=args.bundle)
    edge = NumpyEdge(head, args.split, exits)
    images = np.load(args.images, allow_pickle=False)
    x = edge.normalise(images)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 - closed below
    try:
        for i in range(len(x)):
            out.write(json.dumps(edge.infer(x[i : i + 1]).to_dict()) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    torch_loaded = "torch" in sys.modules
    print(json.dumps({"requests": len(x), "torch_imported": torch_loaded}), file=sys.stderr)
    return 3 if torch_loaded else 0


if __name__ == "__main__":
    raise SystemExit(main())
