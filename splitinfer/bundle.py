"""The plan bundle: what the partitioner hands to both daemons.

A directory holding a versioned ``plan.json`` (validated with pydantic) and safetensors weight files::

    plan.json            format, version, model identity, input spec, stages, boundaries, exits, codec,
                         split, operating points, and the sha256 of every other file
    model.safetensors    the model's weights
    exits.safetensors    the exit heads' weights (absent when the plan has no exits)
    codec.safetensors    the learned bottleneck codec (encoder, quantizer ranges, probability tables,
                         decoder), present when the plan carries one (``learned_codec``)
    head_calibration.safetensors
                         calibration inputs of an int8 head (``head.kind == "int8"``): the edge quantizes
                         its head from them at start-up (quantized tensors do not fit safetensors)

Loading never executes pickled code: weights are read with safetensors only, every file's hash is
checked, and a bundle holding a pickle payload (or anything else unexpected) is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel as _PydanticBase
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from splitinfer.errors import BundleError
from splitinfer.exits import ExitHead
from splitinfer.models import build_model
from splitinfer.staged import StagedModel, stage_model

log = logging.getLogger("splitinfer.bundle")

PLAN_FORMAT = "splitinfer-plan"
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
MAX_INPUT_ELEMENTS = 50_000_000
TRUST_FACTORY_ENV = "SPLITINFER_TRUST_MODEL_FACTORY"
MODEL_FILE = "model.safetensors"
EXITS_FILE = "exits.safetensors"
CODEC_FILE = "codec.safetensors"
HEAD_CALIBRATION_FILE = "head_calibration.safetensors"
LEARNED_CODECS = ("bottleneck",)
IMAGE_CODEC = "image"  # cloud-only by sending the input as a PNG/JPEG file (split 0; splitinfer.imaging)


class BaseModel(_PydanticBase):
    """Plan models: infinite thresholds (an exit that never fires) are written as JSON ``Infinity``."""

    model_config = ConfigDict(ser_json_inf_nan="constants")


class InputSpec(BaseModel):
    """What one input sample looks like before the model and how raw images are normalised."""

    shape: list[int] = Field(description="per-sample tensor shape [C, H, W]")
    dtype: Literal["float32"] = "float32"
    mean: list[float]
    std: list[float]
    labels: list[str]

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if len(self.shape) != 3 or any(d <= 0 for d in self.shape):
            raise ValueError(f"input shape must be 3 positive dimensions [C, H, W], got {self.shape}")
        if math.prod(self.shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input shape {self.shape} exceeds {MAX_INPUT_ELEMENTS} elements")
        c = self.shape[0]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean and std need one value per channel ({c}); got {len(self.mean)} and {len(self.std)}")
        if any(not math.isfinite(v) for v in self.mean) or any(not (v > 0 and math.isfinite(v)) for v in self.std):
            raise ValueError("mean must be finite and std positive")
        if not self.labels:
            raise ValueError("labels must not be empty")
        return self


class ModelSpec(BaseModel):
    """Model identity: a registry name or a ``module:factory`` import path, plus its weights."""

    name: str
    factory: str | None = Field(None, description="module:function building the nn.Module (user models)")
    num_classes: int
    params: int
    weights: str = MODEL_FILE
    weights_source: Literal["committed", "checkpoint", "random"] | None = Field(
        None, description="where the weights came from: 'committed' (the embedded default's), 'checkpoint' (a "
                          "user's safetensors) or 'random' (an untrained initialisation: latency and bytes are "
                          "real, answers are not); None in bundles written before this field existed")

    @property
    def random_weights(self) -> bool:
        """True when the weights are an untrained initialisation (answers are meaningless)."""
        return self.weights_source == "random"


class BoundarySpec(BaseModel):
    index: int
    node: str
    shape: list[int]
    fp32_bytes: int


class StageSpec(BaseModel):
    index: int
    macs: int
    params: int
    edge_ms: float | None = None
    server_ms: float | None = None


class ExitSpec(BaseModel):
    """An exit head at a boundary, with its confidence threshold and calibration figures.

    ``threshold`` may be ``Infinity`` in JSON (the exit never fires, e.g. when nothing could be certified).
    """

    boundary: int
    threshold: float
    score: Literal["max_softmax", "margin", "neg_entropy"] = "max_softmax"
    hidden: int = Field(32, ge=1, le=4096)
    macs: int = 0
    val_exit_rate: float | None = None


class ExitCalibrationSpec(BaseModel):
    """How the exit thresholds were chosen, and the reference the edge's drift monitor compares with."""

    mode: Literal["certified", "empirical"]
    score: Literal["max_softmax", "margin", "neg_entropy"]
    epsilon: float
    delta: float
    n_path: int
    n_test: int
    disagreements: int
    p_value: float | None = None
    upper_bound: float | None = Field(None, description="Clopper-Pearson upper bound on the disagreement rate")
    exit_rates: dict[int, float] = Field(description="fraction of calibration samples answered at each exit")
    first_exit_conf_edges: list[float] = Field(
        default_factory=list, description="deciles of the first exit's score on calibration samples")
    notes: list[str] = Field(default_factory=list)


class CodecSpec(BaseModel):
    name: str
    params: dict[str, float | int | str | bool] = Field(default_factory=dict)


class SplitEstimate(BaseModel):
    """The planner's estimate for one split and codec (every split is listed, the chosen one included)."""

    split: int
    codec: str = "uint8-affine"
    expected_latency_ms: float
    edge_ms: float
    transfer_ms: float
    server_ms: float
    bytes_per_offload: int
    offload_rate: float
    exits: list[int]
    expected_energy_j: float | None = None
    expected_bytes: float | None = Field(None, description="bytes sent per request (offload rate x payload)")
    accuracy_drop_points: float | None = Field(None, description="estimated validation accuracy drop vs the full "
                                                                 "model (exits and codec), in points")
    edge_memory_bytes: int | None = Field(None, description="head weights + peak activations on the edge")


class OperatingPoint(BaseModel):
    """A network condition and the configuration chosen for it."""

    bandwidth_bps: float
    rtt_ms: float
    split: int
    codec: str
    exits: list[int]
    expected_latency_ms: float
    expected_bytes: float
    expected_agreement: float | None = None
    expected_energy_j: float | None = None


class LatencyCurve(BaseModel):
    """Expected latency of every split (its best codec and exits) at one bandwidth and RTT."""

    bandwidth_bps: float
    rtt_ms: float
    splits: list[int]
    latency_ms: list[float]


class HeadSpec(BaseModel):
    """How the edge runs its head: float32 as trained, or int8 (post-training static quantization, per
    segment between ``cuts``: 0, every exit boundary before the split, and the split)."""

    kind: Literal["fp32", "int8"] = "fp32"
    cuts: list[int] = Field(default_factory=list)
    calibration_images: int = 0
    notes: dict[str, float | int | str] = Field(default_factory=dict)


class Plan(BaseModel):
    """``plan.json``. Versioned: a loader refuses a format or version it does not know."""

    format: Literal["splitinfer-plan"] = PLAN_FORMAT
    version: Literal[1] = PLAN_VERSION
    created: str
    model: ModelSpec
    input: InputSpec
    boundaries: list[BoundarySpec]
    stages: list[StageSpec]
    exits: list[ExitSpec] = Field(default_factory=list)
    exit_calibration: ExitCalibrationSpec | None = None
    split: int
    codec: CodecSpec
    active_exits: list[int] | None = Field(None, description="exits the edge evaluates at the chosen split "
                                           "(None: every exit before the split)")
    active_exit_rates: dict[int, float] | None = Field(None, description="validation exit rates of the active "
                                                       "exits used together (the drift monitor's reference)")
    learned_codec: CodecSpec | None = Field(None, description="the learned codec this bundle carries, if any")
    head: HeadSpec = Field(default_factory=HeadSpec)
    estimates: list[SplitEstimate] = Field(default_factory=list)
    operating_points: list[OperatingPoint] = Field(default_factory=list)
    pareto: list[SplitEstimate] = Field(default_factory=list, description="configurations not dominated in "
                                        "latency, edge energy and bytes at the planned link (within constraints)")
    objective: dict[str, str | float] = Field(default_factory=dict, description="objective, weights, constraints")
    latency_curves: list[LatencyCurve] = Field(default_factory=list, description="latency vs split at several "
                                               "bandwidths (the planned RTT), for reports")
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 of every other file")
    notes: dict[str, str | float | int] = Field(default_factory=dict)

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, codec: CodecSpec) -> CodecSpec:
        from splitinfer.codec import CODECS

        known = sorted([*CODECS, *LEARNED_CODECS, IMAGE_CODEC])
        if codec.name not in known:
            raise ValueError(f"unknown codec {codec.name!r}; known: {', '.join(known)}")
        return codec

    @field_validator("learned_codec")
    @classmethod
    def _known_learned_codec(cls, codec: CodecSpec | None) -> CodecSpec | None:
        if codec is None:
            return None
        if codec.name not in LEARNED_CODECS:
            raise ValueError(f"unknown learned codec {codec.name!r}; known: {', '.join(LEARNED_CODECS)}")
        from splitinfer.bottleneck import BottleneckConfig

        BottleneckConfig.from_params(codec.params)  # raises ValueError on incomplete params
        return codec

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if len(self.input.labels) != self.model.num_classes:
            raise ValueError(f"{len(self.input.labels)} labels for a model with {self.model.num_classes} classes")
        boundaries = [e.boundary for e in self.exits]
        if len(set(boundaries)) != len(boundaries):
            raise ValueError(f"exit boundaries repeat: {boundaries}")
        points = [("the plan", self.active_exits)] + [(f"operating point at split {p.split}", p.exits)
                                                      for p in self.operating_points]
        for where, active in points:
            if active is not None and not set(active) <= set(boundaries):
                raise ValueError(f"{where} enables exits {sorted(set(active) - set(boundaries))} the plan lacks")
        if self.active_exit_rates is not None and not set(self.active_exit_rates) <= set(self.active_exits or []):
            raise ValueError("active_exit_rates names exits that are not active")
        lc = self.learned_codec
        uses = [(self.split, self.codec.name)] + [(p.split, p.codec) for p in self.operating_points]
        for split, name in uses:
            if name == IMAGE_CODEC and split != 0:
                raise ValueError(f"codec {IMAGE_CODEC!r} sends the input file: it works at split 0 only, not {split}")
            if name not in LEARNED_CODECS:
                continue
            if lc is None or lc.name != name:
                raise ValueError(f"the plan uses codec {name!r}, which this bundle does not carry")
            at = int(lc.params["boundary"])
            if split != at:
                raise ValueError(f"the {name} codec works at boundary {at} only; the plan uses it at split {split}")
        if lc is not None:
            at = int(lc.params["boundary"])
            if not 0 < at < len(self.boundaries) - 1:
                raise ValueError(f"learned codec boundary {at} is not an interior boundary")
        if self.head.kind == "int8":
            expected = sorted({0, self.split, *(e.boundary for e in self.exits if e.boundary < self.split)})
            if self.head.cuts != expected:
                raise ValueError(f"int8 head cuts {self.head.cuts} must be {expected} (0, exits before the split, "
                                 "the split)")
        return self


@dataclass
class Bundle:
    """A loaded bundle: the plan, the staged model and the exit heads (keyed by boundary)."""

    path: Path
    plan: Plan
    staged: StagedModel
    exits: dict[int, ExitHead]
    learned_codec: object | None = None  # splitinfer.bottleneck.LearnedCodec when the plan carries one
    _edge_head: object | None = None

    def edge_head(self):
        """What the edge runs its head with: the staged model itself (fp32), or for an int8 plan a
        :class:`~splitinfer.compress.SegmentedHead` quantized now from the bundled calibration inputs (built
        once, a few seconds). Both offer ``run(x, start, end)`` between the plan's exit boundaries and split."""
        if self.plan.head.kind == "fp32":
            return self.staged
        if self._edge_head is None:
            from splitinfer.compress import int8_head

            calib = _load_safetensors(self.path / HEAD_CALIBRATION_FILE).get("x")
            if calib is None or list(calib.shape[1:]) != list(self.plan.input.shape):
                raise BundleError(f"{HEAD_CALIBRATION_FILE} must hold a tensor 'x' of shape [N, "
                                  f"{', '.join(map(str, self.plan.input.shape))}]")
            self._edge_head = int8_head(self.staged, self.plan.split, calib.to(torch.float32), self.plan.head.cuts)
        return self._edge_head

    @property
    def num_stages(self) -> int:
        return self.staged.num_stages

    def codec_for(self, name: object, split: int | None = None):
        """The codec instance called ``name``: a generic one, the bundle's learned codec (which only works at
        its own boundary), or ``image`` (a PNG/JPEG of the input, split 0). Raises InvalidInput otherwise."""
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
            lc = self.learned_codec
            if lc is None or lc.name != name:
                raise InvalidInput(f"codec {name!r} is not in this bundle")
            if split is not None and split != lc.boundary:
                raise InvalidInput(f"codec {name!r} works at boundary {lc.boundary} only, not at split {split}")
            return lc
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
                codec_state: dict[str, torch.Tensor] | None = None,
                head_calibration: torch.Tensor | None = None) -> Path:
    """Write a bundle directory (created if needed); fills ``plan.files`` with the files' hashes.

    ``codec_state`` holds the learned codec's tensors (required when the plan carries a learned codec);
    ``head_calibration`` the int8 head's calibration inputs (required when ``plan.head.kind == "int8"``).
    """
    if (plan.head.kind == "int8") != (head_calibration is not None):
        raise BundleError("an int8 head needs its calibration inputs (head_calibration), and only an int8 head")
    if (plan.learned_codec is not None) != (codec_state is not None):
        raise BundleError("a plan with a learned codec needs its weights (codec_state), and only such a plan")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / MODEL_FILE))
    files = {MODEL_FILE: sha256_file(path / MODEL_FILE)}
    if exits:
        tensors = {f"{b}.{k}": v.detach().contiguous() for b, h in exits.items() for k, v in h.state_dict().items()}
        save_file(tensors, str(path / EXITS_FILE))
        files[EXITS_FILE] = sha256_file(path / EXITS_FILE)
    elif (path / EXITS_FILE).exists():
        (path / EXITS_FILE).unlink()
    if codec_state is not None:
        save_file({k: v.detach().contiguous() for k, v in codec_state.items()}, str(path / CODEC_FILE))
        files[CODEC_FILE] = sha256_file(path / CODEC_FILE)
    elif (path / CODEC_FILE).exists():
        (path / CODEC_FILE).unlink()
    if head_calibration is not None:
        save_file({"x": head_calibration.detach().to(torch.float32).contiguous()}, str(path / HEAD_CALIBRATION_FILE))
        files[HEAD_CALIBRATION_FILE] = sha256_file(path / HEAD_CALIBRATION_FILE)
    elif (path / HEAD_CALIBRATION_FILE).exists():
        (path / HEAD_CALIBRATION_FILE).unlink()
    plan = plan.model_copy(update={"files": files})
    (path / PLAN_FILE).write_text(plan.model_dump_json(indent=2) + "\n")
    return path


def read_plan(path: str | Path) -> Plan:
    """Read and validate ``plan.json`` only (no weights)."""
    path = Path(path)
    plan_path = path / PLAN_FILE if path.is_dir() else path
    if not plan_path.is_file():
        raise BundleError(f"no {PLAN_FILE} in bundle {path}")
    try:
        raw = json.loads(plan_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{plan_path} is not valid JSON (corrupted bundle?): {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{plan_path} must hold a JSON object")
    if raw.get("format") != PLAN_FORMAT:
        raise BundleError(f"{plan_path} is not a splitinfer plan (format {raw.get('format')!r})")
    if raw.get("version") != PLAN_VERSION:
        raise BundleError(
            f"{plan_path} has plan version {raw.get('version')!r}; this build reads version {PLAN_VERSION}"
        )
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{plan_path} does not match the plan schema: {exc}") from exc


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
    state = _load_safetensors(path / plan.model.weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"weights in {plan.model.weights} do not fit model {plan.model.name}: {exc}") from exc
    model.eval()
    try:
        staged = stage_model(model, torch.zeros(1, *plan.input.shape))
    except Exception as exc:  # shape mismatch with the architecture, untraceable model, ...
        raise BundleError(f"cannot run model {plan.model.name} on input shape {plan.input.shape}: "
                          f"{type(exc).__name__}: {exc}") from exc
    if [b.shape for b in staged.boundaries] != [b.shape for b in plan.boundaries]:
        raise BundleError("the model's boundaries do not match plan.json (different architecture or version?)")
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
    return Bundle(path=path, plan=plan, staged=staged, exits=exits, learned_codec=_load_learned_codec(path, plan))


def _load_learned_codec(path: Path, plan: Plan):
    """The plan's learned codec built from ``codec.safetensors`` (None when the plan carries none)."""
    if plan.learned_codec is None:
        return None
    from splitinfer.bottleneck import Bottleneck, BottleneckConfig, LearnedCodec

    if CODEC_FILE not in plan.files:
        raise BundleError(f"plan carries codec {plan.learned_codec.name!r} but lists no {CODEC_FILE}")
    cfg = BottleneckConfig.from_params(plan.learned_codec.params)
    if list(cfg.in_shape) != list(plan.boundaries[cfg.boundary].shape):
        raise BundleError(f"bottleneck input shape {list(cfg.in_shape)} does not match boundary {cfg.boundary} "
                          f"({plan.boundaries[cfg.boundary].shape})")
    try:
        return LearnedCodec(Bottleneck.from_state(cfg, _load_safetensors(path / CODEC_FILE)))
    except (RuntimeError, ValueError) as exc:
        raise BundleError(f"codec weights in {CODEC_FILE} do not fit the plan's bottleneck: {exc}") from exc


def new_plan(model_name: str, staged: StagedModel, input_spec: InputSpec, split: int, codec: CodecSpec,
             exits: list[ExitSpec] | None = None, factory: str | None = None, created: str | None = None,
             weights_source: str | None = None, **extra) -> Plan:
    """Assemble a :class:`Plan` from a staged model (boundaries and stages filled in from it)."""
    import datetime as _dt

    num_classes = len(input_spec.labels)
    return Plan(
        created=created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        model=ModelSpec(name=model_name, factory=factory, num_classes=num_classes,
                        params=sum(p.numel() for p in staged.model.parameters()), weights_source=weights_source),
        input=input_spec,
        boundaries=[BoundarySpec(index=b.index, node=b.node, shape=b.shape, fp32_bytes=b.fp32_bytes)
                    for b in staged.boundaries],
        stages=[StageSpec(index=s.index, macs=s.macs, params=s.params) for s in staged.stage_info],
        exits=exits or [],
        split=split,
        codec=codec,
        **extra,
    )
