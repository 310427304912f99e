"""Exporting a bundle's head to ONNX (needs torch, imported when an export runs, not at import).

Per configuration ``(split, exits)`` -- the plan's, and by default every operating point's, with the exits and
codec the plan's rules give (:meth:`splitinfer.plan.Plan.exits_at`, :meth:`~splitinfer.plan.Plan.codec_at`) --
one segment model per stretch between two cut points, plus every exit head, plus the encoder of every learned
codec the bundle carries (one per boundary; listed by boundary in the manifest's ``learned_codecs``).
Each model goes through :func:`splitinfer.onnx_util.export_onnx` and is checked against torch with
:func:`splitinfer.onnx_util.check_against` on a seeded batch.
"""

from __future__ import annotations

import datetime as _dt
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent.onnx_head.manifest import (
    INPUT_NAME,
    MANIFEST_FILE,
    OUTPUT_NAME,
    CodecEntry,
    ExitEntry,
    FileEntry,
    HeadConfig,
    HeadExportError,
    HeadManifest,
    InputInfo,
    PlanEntry,
    SegmentEntry,
    cuts,
    sha256,
)
from splitinfer.onnx_util import check_against, export_onnx
from splitinfer.plan import PLAN_FILE

CHECK_BATCH = 3


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "onnx", "onnxruntime"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "?"))
    return out


def load(bundle):
    """``bundle`` itself when it is a loaded :class:`~splitinfer.bundle.Bundle`, else the bundle at that path."""
    from splitinfer.bundle import Bundle, load_bundle

    if isinstance(bundle, Bundle):
        return bundle
    return load_bundle(bundle)


def bundle_configs(bundle, split: int | None, exits: Sequence[int] | None,
                   operating_points: bool) -> tuple[HeadConfig, list[HeadConfig]]:
    """The configuration exported for ``split``/``exits`` (default: the plan's) and, with ``operating_points``,
    every operating point's; exits and codec as the plan's rules give them."""
    plan = bundle.plan
    n = bundle.num_stages
    split = plan.split if split is None else int(split)
    if not 0 <= split <= n:
        raise HeadExportError(f"split {split} outside 0..{n}")
    if exits is None and split == plan.split:
        exits = plan.active_exits
    have = {e.boundary for e in plan.exits if e.boundary in bundle.exits}
    if exits is not None and not set(exits) <= have:
        raise HeadExportError(f"exits {sorted(set(exits) - have)} are not in the bundle")
    main = HeadConfig(split=split, codec=plan.codec_at(split), exits=plan.exits_at(split, exits, have))
    configs = [main]
    if operating_points:
        for p in plan.operating_points:
            c = HeadConfig(split=p.split, codec=plan.codec_at(p.split, p.codec),
                           exits=plan.exits_at(p.split, p.exits, have))
            if c not in configs:
                configs.append(c)
    return main, configs


class Exporter:
    """Exports and checks the pieces of one bundle (torch needed); keeps the seeded check inputs."""

    def __init__(self, bundle, seed: int = 0):
        import torch

        if bundle.plan.head.kind != "fp32":
            raise HeadExportError(f"the plan runs a {bundle.plan.head.kind} head; only fp32 heads export to ONNX "
                                  "(use the torch backend for an int8 head)")
        self.bundle = bundle
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(CHECK_BATCH, *bundle.plan.input.shape, generator=gen)
        from splitinfer.head import walk
        from splitinfer.torch_head import TorchStages

        n = bundle.staged.num_stages
        with torch.inference_mode():  # every boundary's tensor, kept (a stage may work in place on its input)
            steps = walk(TorchStages(bundle.staged), x.clone(), n, points=range(1, n))
            self.inputs = [x, *(step.tensor.clone() for step in steps)]

    def _export(self, what: str, module, boundary: int) -> tuple[bytes, float]:
        try:
            data = export_onnx(module, self.inputs[boundary][:1], INPUT_NAME, OUTPUT_NAME)
        except Exception as exc:  # an op the exporter cannot express
            raise HeadExportError(f"cannot export {what}: {type(exc).__name__}: {exc}") from exc
        check = check_against(f"exported {what}", data, module, self.inputs[boundary], input_name=INPUT_NAME,
                              output_name=OUTPUT_NAME, error=HeadExportError)
        return data, check.max_abs_diff

    def segment(self, a: int, b: int) -> tuple[bytes, float]:
        from torch import nn

        return self._export(f"stages {a}..{b - 1}", nn.Sequential(*self.bundle.staged.stages[a:b]).eval(), a)

    def exit(self, b: int) -> tuple[bytes, float]:
        return self._export(f"the exit at boundary {b}", self.bundle.exits[b].eval(), b)

    def encoder(self, boundary: int) -> tuple[bytes, float]:
        """The encoder of the learned codec at ``boundary``: its fused, quantizer-folded encoder, the module
        :class:`~splitinfer.bottleneck.LearnedCodec` runs."""
        lc = self.bundle.learned_codecs[boundary]
        return self._export(f"the learned codec's encoder at boundary {boundary}", lc._encoder, boundary)


def build(bundle, split: int | None, exits: Sequence[int] | None, operating_points: bool, fallback_tail: bool,
          seed: int) -> tuple[HeadManifest, dict[str, bytes]]:
    """Export every piece the configurations need; returns the manifest and ``file name -> bytes`` (the ONNX
    models and the plan)."""
    plan = bundle.plan
    n = bundle.num_stages
    main, configs = bundle_configs(bundle, split, exits, operating_points)
    ex = Exporter(bundle, seed)
    files: dict[str, bytes] = {}
    pairs: set[tuple[int, int]] = set()
    for c in configs:
        cut = cuts(c.split, c.exits)
        pairs.update(zip(cut, cut[1:], strict=False))
        if fallback_tail and c.split < n:
            pairs.add((c.split, n))
    segments = []
    for a, b in sorted(pairs):
        data, diff = ex.segment(a, b)
        name = f"seg_{a:02d}_{b:02d}.onnx"
        files[name] = data
        segments.append(SegmentEntry(file=name, sha256=sha256(data), bytes=len(data), max_abs_diff=diff, start=a,
                                     end=b))
    spec = {e.boundary: e for e in plan.exits}
    exit_entries = []
    for b in sorted(bundle.exits):  # every exit (a few tens of kB each), so any operating point finds its exits
        data, diff = ex.exit(b)
        name = f"exit_{b:02d}.onnx"
        files[name] = data
        exit_entries.append(ExitEntry(file=name, sha256=sha256(data), bytes=len(data), max_abs_diff=diff,
                                      boundary=b, threshold=spec[b].threshold, score=spec[b].score))
    learned = []
    for b, lc in sorted(bundle.learned_codecs.items()):  # every one, so any operating point finds its encoder
        data, diff = ex.encoder(b)
        name = f"encoder_{b:02d}.onnx"
        files[name] = data
        learned.append(CodecEntry(name=lc.name, boundary=b, bits=lc.cfg.bits, coder=lc.cfg.coder,
                                  latent_shape=list(lc.cfg.latent_shape),
                                  tables=[[float(v) for v in row] for row in lc.bottleneck.tables.numpy()],
                                  encoder=FileEntry(file=name, sha256=sha256(data), bytes=len(data),
                                                    max_abs_diff=diff)))
    plan_bytes = (plan.model_dump_json(indent=2) + "\n").encode()
    files[PLAN_FILE] = plan_bytes
    manifest = HeadManifest(
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), exporter=_versions(), model=plan.model.name,
        num_stages=n, boundaries=[list(b.shape) for b in plan.boundaries],
        input=InputInfo(shape=list(plan.input.shape), mean=list(plan.input.mean), std=list(plan.input.std),
                        labels=list(plan.input.labels)),
        bundle_files=dict(plan.files), split=main.split, active_exits=main.exits,
        codec=CodecEntry(name=main.codec), learned_codecs=learned, configs=configs,
        segments=segments, exits=exit_entries, fallback_tail=fallback_tail,
        plan=PlanEntry(file=PLAN_FILE, sha256=sha256(plan_bytes), bytes=len(plan_bytes)))
    return manifest, files


def export_head(bundle, split: int | None = None, exits: Sequence[int] | None = None,
                out_dir: str | Path = "onnx-head", *, operating_points: bool = True, fallback_tail: bool = True,
                seed: int = 0) -> HeadManifest:
    """Export the edge head of ``bundle`` (a :class:`~splitinfer.bundle.Bundle` or a bundle directory) to
    ``out_dir`` as ONNX models plus ``onnx_head.json`` (and a copy of the plan), and return the manifest.
    Needs torch.

    ``split`` defaults to the plan's split; ``exits`` (the exits enabled, as in
    :meth:`EdgeRuntime.set_operating_point`) to the plan's ``active_exits`` at the planned split, else every
    exit. With ``operating_points`` every operating point of the plan is covered too, so an agent can switch.
    ``fallback_tail`` adds ``split -> num_stages`` (the on-device answer when the server is down).
    Raises :class:`HeadExportError` when a piece does not export or does not match torch.
    """
    bundle = load(bundle)
    manifest, files = build(bundle, split, exits, operating_points, fallback_tail, seed)
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
