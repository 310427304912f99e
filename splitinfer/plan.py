"""The plan schema (``plan.json``) and the plan's rules, readable without torch.

Everything a role needs to know about a bundle without loading its weights lives here: the pydantic models of
``plan.json``, :func:`read_plan`, the learned bottleneck's configuration, and the two rules every role applies
the same way, on the plan:

* :meth:`Plan.exits_at` -- which exits the edge evaluates at a split (the enabled ones, in ``1..split``);
* :meth:`Plan.codec_at` -- which codec carries the features at a split (the plan's where it applies, else
  ``uint8-affine``); a learned codec applies only at a boundary where the plan carries one
  (:meth:`Plan.learned_codec_at`: a plan carries any number of learned codecs, one per boundary at most).

:mod:`splitinfer.bundle` (weights, needs torch) re-exports these names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel as _PydanticBase
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from splitinfer.errors import BundleError

PLAN_FORMAT = "splitinfer-plan"
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
MAX_INPUT_ELEMENTS = 50_000_000
TRUST_FACTORY_ENV = "SPLITINFER_TRUST_MODEL_FACTORY"
MODEL_FILE = "model.safetensors"
EXITS_FILE = "exits.safetensors"
LEGACY_CODEC_FILE = "codec.safetensors"  # the one learned codec of bundles written before codec_<boundary> files
HEAD_CALIBRATION_FILE = "head_calibration.safetensors"
LEARNED_CODECS = ("bottleneck",)
GENERIC_CODECS = ("float32", "uint8-affine")  # splitinfer.codec.CODECS (checked there)
FALLBACK_CODEC = "uint8-affine"  # where the plan's codec does not apply: works at every split
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

    compression: dict | None = Field(
        None, description="the compressed model's recipe (splitinfer.compression.artifact: method, structure of "
                          "factorized layers, base model); its weights file may hold coded layers; None: as trained")

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
    network_ms: float | None = Field(None, description="per offload: transfer + RTT + response + expected "
                                                      "retransmissions, ms")
    response_bytes: int | None = Field(None, description="the answer's payload per offload, bytes")
    expected_energy_j: float | None = None
    expected_bytes: float | None = Field(None, description="bytes sent per request (offload rate x payload)")
    accuracy_drop_points: float | None = Field(None, description="estimated validation accuracy drop vs the full "
                                                                 "model (exits and codec), in points")
    edge_memory_bytes: int | None = Field(None, description="head weights + peak activations on the edge")
    head: str = Field("fp32", description="the head variant: fp32 or a compressed model (joint planning)")
    bundle_bytes: int | None = Field(None, description="the head variant's bundle weights + exits + codecs, bytes")
    exit_share: float | None = Field(None, description="joint planning: the share of epsilon the exits' search "
                                                       "thresholds were calibrated at (variant and exits together)")
    disagreement: float | None = Field(None, description="final answers vs the full fp32 model on the validation "
                                                         "images (joint planning: head, exits, codec end to end)")
    disagreement_bound: float | None = Field(None, description="upper confidence bound (at delta) of that rate")
    leakage_ssim: float | None = Field(None, description="SSIM of a white-box inversion of the payload this "
                                                         "configuration sends (leakage table; 0: edge-only)")


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
    # The prediction's parts, so that the edge agent can predict this configuration's latency on another link and
    # with its own measured speeds (edge_agent/adapt.py); None in bundles planned before they were recorded.
    edge_part_ms: float | None = Field(None, description="expected edge time per request (head, exits, encoding, "
                                                         "the agent's own work; over the exit rates)")
    server_ms: float | None = Field(None, description="expected server time (queue + decode + tail) per offload")
    offload_rate: float | None = Field(None, description="fraction of requests sent to the server")
    request_bytes: float | None = Field(None, description="bytes on the uplink per offload (payload + protocol)")
    response_bytes: float | None = Field(None, description="bytes on the downlink per offload (answer + protocol)")

    def predicted_ms(self, bandwidth_bps: float, rtt_s: float, edge_scale: float = 1.0,
                     server_scale: float = 1.0) -> float | None:
        """Expected latency (ms) of this configuration on a link of ``bandwidth_bps`` and ``rtt_s`` with the edge's
        and the server's times scaled by the given factors (None without the recorded parts). Uplink and
        downlink at the same rate, no loss: the planner's model of the grid's links."""
        if self.edge_part_ms is None or self.offload_rate is None or self.server_ms is None:
            return None
        q = self.offload_rate
        if q <= 0:
            return self.edge_part_ms * edge_scale
        wire = ((self.request_bytes or 0.0) + (self.response_bytes or 0.0)) * 8 / bandwidth_bps
        return self.edge_part_ms * edge_scale + q * ((rtt_s + wire) * 1e3 + self.server_ms * server_scale)


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
    learned_codecs: list[CodecSpec] = Field(default_factory=list, description="the learned codecs this bundle "
                                            "carries, each at its own interior boundary (params 'boundary'), "
                                            "sorted by boundary; weights in codec_<boundary>.safetensors")
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
        known = sorted([*GENERIC_CODECS, *LEARNED_CODECS, IMAGE_CODEC])
        if codec.name not in known:
            raise ValueError(f"unknown codec {codec.name!r}; known: {', '.join(known)}")
        return codec

    @model_validator(mode="before")
    @classmethod
    def _legacy_learned_codec(cls, data: object) -> object:
        """Plans written before several learned codecs held ``learned_codec`` (one spec or null): read it as
        ``learned_codecs``."""
        if isinstance(data, dict) and "learned_codec" in data:
            data = dict(data)
            legacy = data.pop("learned_codec")
            if legacy is not None:
                if data.get("learned_codecs"):
                    raise ValueError("the plan holds both learned_codec (old) and learned_codecs; keep one")
                data["learned_codecs"] = [legacy]
        return data

    @field_validator("learned_codecs")
    @classmethod
    def _known_learned_codecs(cls, codecs: list[CodecSpec]) -> list[CodecSpec]:
        for codec in codecs:
            if codec.name not in LEARNED_CODECS:
                raise ValueError(f"unknown learned codec {codec.name!r}; known: {', '.join(LEARNED_CODECS)}")
            BottleneckConfig.from_params(codec.params)  # raises ValueError on incomplete params
        at = [_boundary(c) for c in codecs]
        if len(set(at)) != len(at):
            raise ValueError(f"learned codec boundaries repeat: {at} (one learned codec per boundary)")
        return sorted(codecs, key=_boundary)

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
        for lc in self.learned_codecs:
            at = _boundary(lc)
            if not 0 < at < len(self.boundaries) - 1:
                raise ValueError(f"learned codec boundary {at} is not an interior boundary")
        uses = [(self.split, self.codec.name)] + [(p.split, p.codec) for p in self.operating_points]
        for split, name in uses:
            if name == IMAGE_CODEC and split != 0:
                raise ValueError(f"codec {IMAGE_CODEC!r} sends the input file: it works at split 0 only, not {split}")
            if name not in LEARNED_CODECS or self.codec_applies(name, split):
                continue
            have = self.learned_boundaries(name)
            if not have:
                raise ValueError(f"the plan uses codec {name!r}, which this bundle does not carry")
            raise ValueError(f"the {name} codec works at {boundaries_text(have)} only; the plan uses it at split "
                             f"{split}")
        if self.head.kind == "int8":
            expected = sorted({0, self.split, *(e.boundary for e in self.exits if e.boundary < self.split)})
            if self.head.cuts != expected:
                raise ValueError(f"int8 head cuts {self.head.cuts} must be {expected} (0, exits before the split, "
                                 "the split)")
        return self

    # ------------------------------------------------------------------ rules every role applies

    def exits_at(self, split: int, enabled: Iterable[int] | None = None,
                 available: Iterable[int] | None = None) -> list[int]:
        """The exits the edge evaluates at ``split``, in order: the ``enabled`` ones (default: every exit of the
        plan) in ``1..split`` that have a head (``available``, default: the plan's exits)."""
        have = {e.boundary for e in self.exits} if available is None else set(available)
        chosen = sorted(have) if enabled is None else sorted(set(enabled))
        return [b for b in chosen if 0 < b <= split and b in have]

    def planned_exits(self, available: Iterable[int] | None = None) -> list[int]:
        """The exits evaluated at the planned split (``active_exits``; every exit before it when unset)."""
        return self.exits_at(self.split, self.active_exits, available)

    def codec_applies(self, name: str, split: int) -> bool:
        """True when codec ``name`` can carry the features at ``split`` for this plan."""
        if name in GENERIC_CODECS:
            return True
        if name == IMAGE_CODEC:
            return split == 0
        lc = self.learned_codec_at(split)
        return lc is not None and lc.name == name

    def learned_codec_at(self, split: int) -> CodecSpec | None:
        """The learned codec the plan carries at boundary ``split`` (None when it carries none there)."""
        return next((c for c in self.learned_codecs if _boundary(c) == split), None)

    def learned_boundaries(self, name: str | None = None) -> list[int]:
        """The boundaries of the plan's learned codecs (called ``name``, when given), ascending."""
        return sorted(_boundary(c) for c in self.learned_codecs if name is None or c.name == name)

    def learned_codec_file(self, boundary: int) -> str:
        """The bundle file holding the weights of the learned codec at ``boundary``: ``codec_<boundary>.safetensors``,
        or ``codec.safetensors`` for a bundle written before several learned codecs (its plan lists that file, and
        one learned codec)."""
        name = codec_file(boundary)
        if name not in self.files and LEGACY_CODEC_FILE in self.files and len(self.learned_codecs) == 1:
            return LEGACY_CODEC_FILE
        return name

    def codec_at(self, split: int, codec: str | None = None) -> str:
        """The codec used at ``split``: ``codec`` when given, else the plan's codec where it applies, else
        ``uint8-affine`` (which works everywhere)."""
        if codec is not None:
            return codec
        return self.codec.name if self.codec_applies(self.codec.name, split) else FALLBACK_CODEC

    def thresholds(self, boundaries: Iterable[int] | None = None) -> dict[int, float]:
        """Threshold of every exit (or of ``boundaries``)."""
        want = None if boundaries is None else set(boundaries)
        return {e.boundary: e.threshold for e in self.exits if want is None or e.boundary in want}

    def scores(self) -> dict[int, str]:
        """Confidence score of every exit."""
        return {e.boundary: e.score for e in self.exits}


LATENT_FRACTION = 24  # BottleneckConfig.for_boundary: the latent keeps ~1/24 of the boundary's values


@dataclass(frozen=True)
class BottleneckConfig:
    """Architecture and rate settings (stored in the plan's codec params).

    ``in_shape`` is a ``[C, H, W]`` feature map or an ``[L, D]`` token sequence (a transformer between blocks):
    tokens are coded as a ``[D, L, 1]`` map, so the encoder is a linear map over the channel dimension of each
    token (1x1 convolutions) and ``stride`` > 1 merges that many consecutive tokens (a ``stride x 1`` patch)."""

    boundary: int
    in_shape: tuple[int, ...]
    channels: int = 8
    bits: int = 3
    stride: int = 2
    hidden: int = 64
    coder: str = "ans"

    def __post_init__(self):
        if len(self.in_shape) not in (2, 3) or any(int(d) <= 0 for d in self.in_shape):
            raise ValueError(f"a bottleneck attaches to a [C, H, W] map or an [L, D] token sequence, not "
                             f"{list(self.in_shape)}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be 1..8, got {self.bits}")
        if self.stride not in (1, 2, 4):
            raise ValueError(f"stride must be 1, 2 or 4, got {self.stride}")
        if not 1 <= self.channels <= 1024 or not 1 <= self.hidden <= 4096:
            raise ValueError("channels must be 1..1024 and hidden 1..4096")

    @property
    def tokens(self) -> bool:
        """True for an ``[L, D]`` token sequence."""
        return len(self.in_shape) == 2

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """The ``[C, H, W]`` map the convolutions see: the features themselves, or ``[D, L, 1]`` for tokens."""
        if self.tokens:
            length, dim = self.in_shape
            return (int(dim), int(length), 1)
        c, h, w = self.in_shape
        return (int(c), int(h), int(w))

    @property
    def kernel(self) -> tuple[int, int]:
        """The stride (and kernel) of the encoder's first and the decoder's last layer: ``s x s`` on a map,
        ``s x 1`` on tokens (merging ``s`` consecutive tokens)."""
        return (self.stride, 1) if self.tokens else (self.stride, self.stride)

    @classmethod
    def for_boundary(cls, boundary: int, shape: Iterable[int], *, bits: int = 2, coder: str = "ans",
                     channels: int | None = None, hidden: int | None = None,
                     stride: int | None = None) -> BottleneckConfig:
        """The bottleneck for boundary ``boundary`` with features ``shape`` ``[C, H, W]`` (or tokens ``[L, D]``,
        sized as the map ``[D, L, 1]``): the size rule.

        ``channels``, ``hidden`` and ``stride`` given explicitly are kept; each one left ``None`` follows from
        the shape, in this order:

        * ``stride`` = 2 when both ``H`` and ``W`` are at least 8, else 1: a 2x2 patch convolution halves each
          side of the latent while it keeps at least 4x4 positions; smaller maps are not downsampled. Tokens are
          not merged unless asked (``stride`` 2 or 4): every token keeps its own latent.
        * ``hidden`` = ``min(64, max(16, C))``: encoder and decoder are as wide as the boundary, at least 16
          channels and at most 64 (their cost grows with it, and the encoder runs on the edge per request).
        * ``channels`` = ``round(C * stride**2 / 24)`` (tokens: ``round(D * stride / 24)``), clamped to ``4..64``
          and to at most ``hidden``: the latent holds about 1/24 of the boundary's values
          (:data:`LATENT_FRACTION`), the ratio of the committed default codec (48x14x14 -> 8x7x7), before
          ``bits``-bit quantization and entropy coding.

        The default model's boundary 6 (48x14x14) gets that codec's stride 2, hidden 48 and 8 channels; a
        512x7x7 map stride 1, hidden 64, 21 channels; 1280x2x2 stride 1, hidden 64, 53 channels; 50 tokens of
        96 stride 1, hidden 64, 4 channels.
        """
        dims = [int(d) for d in shape]
        if len(dims) not in (2, 3) or any(d <= 0 for d in dims):
            raise ValueError(f"a bottleneck attaches to a [C, H, W] map or an [L, D] token sequence, not {dims}")
        tokens = len(dims) == 2
        c, h, w = (dims[1], dims[0], 1) if tokens else dims
        if stride is None:
            stride = 1 if tokens else 2 if min(h, w) >= 8 else 1
        if hidden is None:
            hidden = min(64, max(16, c))
        if channels is None:
            area = stride if tokens else stride * stride
            channels = min(max(4, round(c * area / LATENT_FRACTION)), 64, hidden)
        return cls(boundary=boundary, in_shape=tuple(dims), channels=channels, bits=bits, stride=stride,
                   hidden=hidden, coder=coder)

    @property
    def latent_shape(self) -> list[int]:
        _, h, w = self.map_shape
        sh, sw = self.kernel
        return [self.channels, latent_side(h, sh), latent_side(w, sw)]

    def to_params(self) -> dict[str, int | str]:
        d = asdict(self)
        d["in_shape"] = ",".join(str(v) for v in self.in_shape)
        return d

    @classmethod
    def from_params(cls, params: dict) -> BottleneckConfig:
        try:
            shape = tuple(int(v) for v in str(params["in_shape"]).split(","))
            return cls(boundary=int(params["boundary"]), in_shape=shape, channels=int(params["channels"]),
                       bits=int(params["bits"]), stride=int(params["stride"]), hidden=int(params["hidden"]),
                       coder=str(params.get("coder", "ans")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bottleneck codec params are incomplete or invalid: {exc}") from exc


def _boundary(codec: CodecSpec) -> int:
    return int(codec.params["boundary"])


def codec_file(boundary: int) -> str:
    """The bundle file of the learned codec at ``boundary`` (hashed in ``plan.files`` like every weight file)."""
    return f"codec_{int(boundary)}.safetensors"


def boundaries_text(boundaries: Iterable[int]) -> str:
    """``boundary 8`` or ``boundaries 3, 6``: where a learned codec works, for error messages."""
    bs = sorted(boundaries)
    if not bs:
        return "no boundary"
    return f"boundary {bs[0]}" if len(bs) == 1 else f"boundaries {', '.join(map(str, bs))}"


def latent_side(n: int, stride: int) -> int:
    """Latent height/width of a bottleneck with this stride over a side of ``n``."""
    return -(-n // stride)  # ceil: the encoder pads to a multiple of the stride


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
