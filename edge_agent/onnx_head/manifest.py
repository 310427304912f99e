"""``onnx_head.json``: the schema of an exported head, and reading an export back (hashes checked, the plan it
was made for). numpy/pydantic only, no torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from splitinfer.errors import BundleError
from splitinfer.onnx_util import OPSET
from splitinfer.plan import PLAN_FILE, Plan, read_plan

FORMAT = "splitinfer-onnx-head"
VERSION = 1
MANIFEST_FILE = "onnx_head.json"
INPUT_NAME = "x"
OUTPUT_NAME = "y"


class HeadExportError(BundleError):
    """The head (or an exit, or the encoder) cannot be exported, or the export does not reproduce torch."""


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


class PlanEntry(BaseModel):
    """The source bundle's ``plan.json``, copied into the export (the rules: exits and codec per split)."""

    file: str = PLAN_FILE
    sha256: str
    bytes: int


class CodecEntry(BaseModel):
    """A codec: the planned one (``HeadManifest.codec``: its name), or a learned codec at its boundary
    (``HeadManifest.learned_codecs``: also what the torch-free path needs to entropy-code, and its encoder)."""

    name: str
    boundary: int | None = None
    bits: int | None = None
    coder: str | None = None
    latent_shape: list[int] | None = None
    tables: list[list[float]] | None = None
    encoder: FileEntry | None = None


class HeadConfig(BaseModel):
    """One (split, codec, exits) the export covers; ``exits`` are the boundaries the edge evaluates there
    (:meth:`splitinfer.plan.Plan.exits_at`)."""

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
    codec: CodecEntry = Field(description="the codec at the planned split (its name)")
    learned_codecs: list[CodecEntry] = Field(default_factory=list, description="every learned codec of the "
                                             "bundle, one per boundary, ascending: tables, bits and encoder")
    configs: list[HeadConfig]
    segments: list[SegmentEntry]
    exits: list[ExitEntry]
    fallback_tail: bool = True
    plan: PlanEntry | None = Field(None, description="the source plan.json, copied (None: an export made before "
                                                     "plans were copied; pass the bundle)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_codec(cls, data: object) -> object:
        """Exports made before several learned codecs held the one learned codec (with its encoder) in
        ``codec``: read it as ``learned_codecs``."""
        if isinstance(data, dict) and "learned_codecs" not in data and isinstance(data.get("codec"), dict):
            codec = data["codec"]
            if codec.get("encoder") is not None:
                data = {**data, "codec": {"name": codec.get("name")}, "learned_codecs": [codec]}
        return data

    @field_validator("learned_codecs")
    @classmethod
    def _one_per_boundary(cls, codecs: list[CodecEntry]) -> list[CodecEntry]:
        at = [c.boundary for c in codecs]
        if any(c.boundary is None or c.encoder is None or c.tables is None or c.bits is None
               or c.latent_shape is None for c in codecs):
            raise ValueError("every learned codec needs its boundary, bits, latent shape, tables and encoder")
        if len(set(at)) != len(at):
            raise ValueError(f"learned codec boundaries repeat: {at}")
        return sorted(codecs, key=lambda c: c.boundary)

    def learned_codec_at(self, boundary: int) -> CodecEntry | None:
        """The learned codec exported for ``boundary`` (None when the bundle carries none there)."""
        return next((c for c in self.learned_codecs if c.boundary == boundary), None)

    def entries(self) -> list[FileEntry]:
        """The ONNX models of the export."""
        out: list[FileEntry] = [*self.segments, *self.exits]
        out += [c.encoder for c in self.learned_codecs if c.encoder is not None]
        if self.codec.encoder is not None:
            out.append(self.codec.encoder)
        return out


def cuts(split: int, exits: list[int]) -> list[int]:
    """The cut points of a configuration: 0, the exits before the split, and the split."""
    return sorted({0, split, *(b for b in exits if 0 < b < split)})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(directory: str | Path) -> HeadManifest:
    """Read and validate ``onnx_head.json`` of an export; BundleError for a missing, foreign or broken one."""
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
        return HeadManifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{path} does not match the manifest schema: {exc}") from exc


def _read_checked(d: Path, file: str, digest: str) -> bytes:
    if Path(file).name != file:
        raise BundleError(f"{MANIFEST_FILE} names file {file!r} outside {d}")
    fp = d / file
    if not fp.is_file():
        raise BundleError(f"exported head {d} is missing {file}")
    data = fp.read_bytes()
    if sha256(data) != digest:
        raise BundleError(f"{file} is corrupted: sha256 does not match {MANIFEST_FILE}")
    return data


def read_models(directory: str | Path, manifest: HeadManifest) -> dict[str, bytes]:
    """``file name -> bytes`` of every model the manifest lists, each file's sha256 checked."""
    d = Path(directory)
    return {e.file: _read_checked(d, e.file, e.sha256) for e in manifest.entries()}


def read_export_plan(directory: str | Path, manifest: HeadManifest) -> Plan | None:
    """The plan copied into the export (sha256 checked), or None for an export without one."""
    if manifest.plan is None:
        return None
    d = Path(directory)
    _read_checked(d, manifest.plan.file, manifest.plan.sha256)
    return read_plan(d / manifest.plan.file)


def bundle_plan(manifest: HeadManifest, bundle_dir: str | Path) -> Plan:
    """The plan of the bundle ``bundle_dir`` (no torch), checked to be the one the export was made from (same
    weight hashes); BundleError otherwise."""
    plan = read_plan(bundle_dir)
    if dict(plan.files) != manifest.bundle_files:
        raise BundleError(f"the exported head was made from other weights than bundle {bundle_dir} (file hashes "
                          "differ); export it again")
    return plan


def with_plan_exits(manifest: HeadManifest, plan: Plan) -> HeadManifest:
    """The manifest with its exits' thresholds and scores taken from ``plan`` (which ``plan calibrate-exits`` may
    have rewritten since the export)."""
    spec = {e.boundary: e for e in plan.exits}
    exits = [e.model_copy(update={"threshold": spec[e.boundary].threshold, "score": spec[e.boundary].score})
             if e.boundary in spec else e for e in manifest.exits]
    return manifest.model_copy(update={"exits": exits})
