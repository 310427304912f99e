"""The plan bundle: what the partitioner hands to both daemons.

A directory holding a versioned ``plan.json`` (validated with pydantic) and safetensors weight files::

    plan.json            format, version, model identity, input spec, stages, boundaries, exits, codec,
                         split, operating points, and the sha256 of every other file
    model.safetensors    the model's weights
    exits.safetensors    the exit heads' weights (absent when the plan has no exits)
    codec_<B>.safetensors
                         one per learned bottleneck codec the plan carries (``learned_codecs``), at boundary B:
                         encoder, quantizer ranges, probability tables, decoder (bundles written before
                         several learned codecs hold their one codec in ``codec.safetensors``; still read)
    head_calibration.safetensors
                         calibration inputs of an int8 head (``head.kind == "int8"``): the edge quantizes
                         its head from them at start-up (quantized tensors do not fit safetensors)

Loading never executes pickled code: weights are read with safetensors only, every file's hash is
checked, and a bundle holding a pickle payload (or anything else unexpected) is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from splitinfer.errors import BundleError
from splitinfer.exits import ExitHead
from splitinfer.models import build_model
from splitinfer.plan import (  # noqa: F401 - re-exported: the plan schema lives in splitinfer.plan (no torch)
    EXITS_FILE,
    GENERIC_CODECS,
    HEAD_CALIBRATION_FILE,
    IMAGE_CODEC,
    LEARNED_CODECS,
    LEGACY_CODEC_FILE,
    MAX_INPUT_ELEMENTS,
    MODEL_FILE,
    PLAN_FILE,
    PLAN_FORMAT,
    PLAN_VERSION,
    TRUST_FACTORY_ENV,
    BoundarySpec,
    CodecSpec,
    ExitCalibrationSpec,
    ExitSpec,
    HeadSpec,
    InputSpec,
    LatencyCurve,
    ModelSpec,
    OperatingPoint,
    Plan,
    SplitEstimate,
    StageSpec,
    boundaries_text,
    codec_file,
    read_plan,
)
from splitinfer.staged import StagedModel, stage_model

if TYPE_CHECKING:
    from splitinfer.bottleneck import LearnedCodec

log = logging.getLogger("splitinfer.bundle")

@dataclass
class Bundle:
    """A loaded bundle: the plan, the staged model and the exit heads (keyed by boundary)."""

    path: Path
    plan: Plan
    staged: StagedModel
    exits: dict[int, ExitHead]
    learned_codecs: dict[int, LearnedCodec] = field(default_factory=dict)
    """The plan's learned codecs, keyed by boundary."""
    _edge_head: object | None = None

    def edge_head(self):
        """What the edge runs its head with: the staged model itself (fp32), or for an int8 plan a
        :class:`~splitinfer.compression.int8.SegmentedHead` quantized now from the bundled calibration inputs (built
        once, a few seconds). Both offer ``run(x, start, end)`` between the plan's exit boundaries and split."""
        if self.plan.head.kind == "fp32":
            return self.staged
        if self._edge_head is None:
            from splitinfer.compression.int8 import int8_head

            calib = _load_safetensors(self.path / HEAD_CALIBRATION_FILE).get("x")
            if calib is None or list(calib.shape[1:]) != list(self.plan.input.shape):
                raise BundleError(f"{HEAD_CALIBRATION_FILE} must hold a tensor 'x' of shape [N, "
                                  f"{', '.join(map(str, self.plan.input.shape))}]")
            self._edge_head = int8_head(self.staged, self.plan.split, calib.to(torch.float32), self.plan.head.cuts)
        return self._edge_head

    @property
    def num_stages(self) -> int:
        return self.staged.num_stages

    def learned_codec_at(self, split: int) -> LearnedCodec | None:
        """The learned codec at boundary ``split``, or None when the bundle carries none there."""
        return self.learned_codecs.get(split)

    def codec_for(self, name: object, split: int | None = None):
        """The codec instance called ``name`` for features at ``split``: a generic one, the bundle's learned codec
        at that boundary (a learned codec only works at its own boundary; with ``split`` None, the bundle's only
        one of that name), or ``image`` (a PNG/JPEG of the input, split 0). Raises InvalidInput otherwise."""
        from splitinfer.codec import get_codec
        from splitinfer.errors import InvalidInput

        if not isinstance(name, str) or not name:
            raise InvalidInput(f"parameter 'codec' must name a codec, got {name!r}")
        if name == "image":  # cloud-only from a PNG/JPEG: decoded with the plan's input spec
            from splitinfer.imaging import ImageCodec

            if split not in (None, 0):
                raise InvalidInput(f"codec 'image' carries the model input: split must be 0, not {split}")
            return ImageCodec(self.plan.input)
        if name in LEARNED_CODECS:
            have = sorted(b for b, c in self.learned_codecs.items() if c.name == name)
            if not have:
                raise InvalidInput(f"codec {name!r} is not in this bundle")
            if split is None:
                if len(have) > 1:
                    raise InvalidInput(f"codec {name!r} works at {boundaries_text(have)}: name the split")
                return self.learned_codecs[have[0]]
            if split not in have:
                raise InvalidInput(f"codec {name!r} works at {boundaries_text(have)} only, not at split {split}")
            return self.learned_codecs[split]
        return get_codec(name)

    def thresholds(self) -> dict[int, float]:
        """Certified threshold of every exit the plan enables (``active_exits``; all when unset)."""
        active = self.plan.active_exits
        return {e.boundary: e.threshold for e in self.plan.exits if active is None or e.boundary in active}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_safetensors(path: Path) -> bool:
    """True when the file starts with a plausible safetensors header (u64 length, then a JSON object)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= path.stat().st_size - 8 and head[8:9] == b"{"


def looks_like_pickle(path: Path) -> bool:
    """True for a pickle stream (protocol 2+ opcode, or the usual protocol 0/1 openings) or a torch.save zip."""
    if is_safetensors(path):
        return False
    with open(path, "rb") as fh:
        head = fh.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head[:1] in (b"(", b"]", b"}", b"c") and path.suffix not in (".json", ".txt", ".md", ".yaml"):
        return True
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith(".pkl") or "/data/" in n for n in zf.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def build_from_spec(spec: ModelSpec, trust_factory: bool = False) -> torch.nn.Module:
    """Instantiate the architecture named by the plan: a registry name, or a ``module:factory`` import path.

    A factory imports and calls code named in ``plan.json``, which no hash protects; it is honoured only when
    ``trust_factory`` is true or ``$SPLITINFER_TRUST_MODEL_FACTORY=1``.
    """
    if spec.factory:
        if not (trust_factory or os.environ.get(TRUST_FACTORY_ENV) == "1"):
            raise BundleError(f"plan.json names the model factory {spec.factory!r}; importing code named by a bundle "
                              f"needs explicit trust (set {TRUST_FACTORY_ENV}=1)")
        mod_name, _, fn_name = spec.factory.partition(":")
        if not mod_name or not fn_name:
            raise BundleError(f"model factory {spec.factory!r} must look like 'package.module:function'")
        try:
            model = getattr(importlib.import_module(mod_name), fn_name)()
        except Exception as exc:  # user code: any failure is a broken bundle
            raise BundleError(f"model factory {spec.factory!r} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, torch.nn.Module):
            raise BundleError(f"model factory {spec.factory!r} returned {type(model).__name__}, not an nn.Module")
        return model
    try:
        return build_model(spec.name, spec.num_classes)
    except ValueError as exc:
        raise BundleError(str(exc)) from exc


def save_bundle(path: str | Path, plan: Plan, model: torch.nn.Module, exits: dict[int, ExitHead],
                codec_states: dict[int, dict[str, torch.Tensor]] | None = None,
                head_calibration: torch.Tensor | None = None, weights_data: bytes | None = None) -> Path:
    """Write a bundle directory (created if needed); fills ``plan.files`` with the files' hashes.

    ``codec_states`` holds each learned codec's tensors keyed by its boundary (exactly the boundaries of
    ``plan.learned_codecs``), written to ``codec_<boundary>.safetensors``; ``head_calibration`` the int8 head's
    calibration inputs (required when ``plan.head.kind == "int8"``); ``weights_data`` the model file as written
    by ``plan compress`` (coded layers; ``plan.model.compression`` says how to rebuild it), copied unchanged.
    """
    if (plan.model.compression is not None) != (weights_data is not None):
        raise BundleError("a compressed model needs its weights file (weights_data) and its recipe "
                          "(plan.model.compression), both or neither")
    if (plan.head.kind == "int8") != (head_calibration is not None):
        raise BundleError("an int8 head needs its calibration inputs (head_calibration), and only an int8 head")
    codec_states = dict(codec_states or {})
    if sorted(codec_states) != plan.learned_boundaries():
        raise BundleError(f"the plan carries learned codecs at boundaries {plan.learned_boundaries()}: codec_states "
                          f"must hold their weights, keyed by those boundaries (got {sorted(codec_states)})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if weights_data is not None:
        (path / MODEL_FILE).write_bytes(weights_data)
    else:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / MODEL_FILE))
    files = {MODEL_FILE: sha256_file(path / MODEL_FILE)}
    if exits:
        tensors = {f"{b}.{k}": v.detach().contiguous() for b, h in exits.items() for k, v in h.state_dict().items()}
        save_file(tensors, str(path / EXITS_FILE))
        files[EXITS_FILE] = sha256_file(path / EXITS_FILE)
    elif (path / EXITS_FILE).exists():
        (path / EXITS_FILE).unlink()
    for boundary, state in sorted(codec_states.items()):
        name = codec_file(boundary)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path / name))
        files[name] = sha256_file(path / name)
    for stale in [*path.glob("codec_*.safetensors"), path / LEGACY_CODEC_FILE]:
        if stale.name not in files and stale.is_file():
            stale.unlink()
    if head_calibration is not None:
        save_file({"x": head_calibration.detach().to(torch.float32).contiguous()}, str(path / HEAD_CALIBRATION_FILE))
        files[HEAD_CALIBRATION_FILE] = sha256_file(path / HEAD_CALIBRATION_FILE)
    elif (path / HEAD_CALIBRATION_FILE).exists():
        (path / HEAD_CALIBRATION_FILE).unlink()
    plan = plan.model_copy(update={"files": files})
    (path / PLAN_FILE).write_text(plan.model_dump_json(indent=2) + "\n")
    return path


def _check_files(path: Path, plan: Plan) -> None:
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != PLAN_FILE and looks_like_pickle(f):
            raise BundleError(f"refusing bundle {path}: {f.name} is a pickle payload (only safetensors are loaded)")
    for name, digest in plan.files.items():
        fp = path / name
        if Path(name).name != name:
            raise BundleError(f"plan.json names file {name!r} outside the bundle directory")
        if not fp.is_file():
            raise BundleError(f"bundle {path} is missing {name}")
        if not is_safetensors(fp):
            raise BundleError(f"bundle file {name} is not a safetensors file (corrupted?)")
        if sha256_file(fp) != digest:
            raise BundleError(f"bundle file {name} is corrupted: sha256 does not match plan.json")


def _load_safetensors(fp: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(fp))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"cannot read {fp.name} as safetensors (corrupted?): {exc}") from exc


def load_bundle(path: str | Path, trust_factory: bool = False) -> Bundle:
    """Load a bundle directory: validate plan.json, check hashes, refuse pickles, build model and exits."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a directory")
    plan = read_plan(path)
    if plan.model.random_weights:
        log.warning("bundle %s: model %s has random weights (planned without --checkpoint): its answers are "
                    "meaningless; only latency and bytes are real", path, plan.model.name)
    for required in (plan.model.weights,):
        if required not in plan.files:
            raise BundleError(f"plan.json lists no hash for {required}")
    _check_files(path, plan)
    model = build_from_spec(plan.model, trust_factory)
    if plan.model.compression is not None:
        from splitinfer.compression.artifact import rebuild

        try:
            model = rebuild(model, plan.model.compression, (path / plan.model.weights).read_bytes(),
                            torch.zeros(1, *plan.input.shape))
        except BundleError as exc:
            raise BundleError(f"{plan.model.weights}: {exc}") from exc
    else:
        state = _load_safetensors(path / plan.model.weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"weights in {plan.model.weights} do not fit model {plan.model.name}: {exc}") from exc
    model.eval()
    try:
        # MACs are not counted here (that would cost the process ~160 MB: stage_model): plan.json has them
        staged = stage_model(model, torch.zeros(1, *plan.input.shape), count_macs=False)
    except Exception as exc:  # shape mismatch with the architecture, untraceable model, ...
        raise BundleError(f"cannot run model {plan.model.name} on input shape {plan.input.shape}: "
                          f"{type(exc).__name__}: {exc}") from exc
    if [b.shape for b in staged.boundaries] != [b.shape for b in plan.boundaries]:
        raise BundleError("the model's boundaries do not match plan.json (different architecture or version?)")
    if plan.stages and len(plan.stages) != staged.num_stages:
        raise BundleError(f"plan.json describes {len(plan.stages)} stages, the model has {staged.num_stages}")
    for info, spec in zip(staged.stage_info, plan.stages, strict=False):
        info.macs = spec.macs
    if not 0 <= plan.split <= staged.num_stages:
        raise BundleError(f"plan split {plan.split} outside 0..{staged.num_stages}")
    exits: dict[int, ExitHead] = {}
    if plan.exits:
        if EXITS_FILE not in plan.files:
            raise BundleError(f"plan has exits but lists no {EXITS_FILE}")
        tensors = _load_safetensors(path / EXITS_FILE)
        for spec in plan.exits:
            if not 0 < spec.boundary < staged.num_stages:
                raise BundleError(f"exit at boundary {spec.boundary} outside 1..{staged.num_stages - 1}")
            try:
                head = ExitHead(staged.boundaries[spec.boundary].shape, plan.model.num_classes, spec.hidden)
            except ValueError as exc:
                raise BundleError(f"exit at boundary {spec.boundary}: {exc}") from exc
            prefix = f"{spec.boundary}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                head.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise BundleError(f"exit weights for boundary {spec.boundary} do not fit: {exc}") from exc
            exits[spec.boundary] = head.eval()
    if plan.head.kind == "int8" and HEAD_CALIBRATION_FILE not in plan.files:
        raise BundleError(f"plan has an int8 head but lists no {HEAD_CALIBRATION_FILE}")
    return Bundle(path=path, plan=plan, staged=staged, exits=exits, learned_codecs=_load_learned_codecs(path, plan))


def _load_learned_codecs(path: Path, plan: Plan) -> dict[int, LearnedCodec]:
    """The plan's learned codecs keyed by boundary, each built from its file (:meth:`Plan.learned_codec_file`:
    ``codec_<boundary>.safetensors``, or an old bundle's ``codec.safetensors``), whose hash
    :func:`_check_files` has checked."""
    if not plan.learned_codecs:
        return {}
    from splitinfer.bottleneck import Bottleneck, BottleneckConfig, LearnedCodec

    out: dict[int, LearnedCodec] = {}
    for spec in plan.learned_codecs:
        cfg = BottleneckConfig.from_params(spec.params)
        name = plan.learned_codec_file(cfg.boundary)
        if name not in plan.files:
            raise BundleError(f"plan carries codec {spec.name!r} at boundary {cfg.boundary} but lists no {name}")
        if list(cfg.in_shape) != list(plan.boundaries[cfg.boundary].shape):
            raise BundleError(f"bottleneck input shape {list(cfg.in_shape)} does not match boundary {cfg.boundary} "
                              f"({plan.boundaries[cfg.boundary].shape})")
        try:
            out[cfg.boundary] = LearnedCodec(Bottleneck.from_state(cfg, _load_safetensors(path / name)))
        except (RuntimeError, ValueError) as exc:
            raise BundleError(f"codec weights in {name} do not fit the plan's bottleneck at boundary "
                              f"{cfg.boundary}: {exc}") from exc
    return out


def new_plan(model_name: str, staged: StagedModel, input_spec: InputSpec, split: int, codec: CodecSpec,
             exits: list[ExitSpec] | None = None, factory: str | None = None, created: str | None = None,
             weights_source: str | None = None, learned_codecs: list[CodecSpec] | None = None,
             compression: dict | None = None, **extra) -> Plan:
    """Assemble a :class:`Plan` from a staged model (boundaries and stages filled in from it); ``learned_codecs``
    are the learned codecs the bundle carries (each at the boundary its params name)."""
    import datetime as _dt

    num_classes = len(input_spec.labels)
    return Plan(
        created=created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        model=ModelSpec(name=model_name, factory=factory, num_classes=num_classes,
                        params=sum(p.numel() for p in staged.model.parameters()), weights_source=weights_source,
                        compression=compression),
        input=input_spec,
        boundaries=[BoundarySpec(index=b.index, node=b.node, shape=b.shape, fp32_bytes=b.fp32_bytes)
                    for b in staged.boundaries],
        stages=[StageSpec(index=s.index, macs=s.macs, params=s.params) for s in staged.stage_info],
        exits=exits or [],
        split=split,
        codec=codec,
        learned_codecs=list(learned_codecs or []),
        **extra,
    )
