"""The committed weights of the embedded models (backbone and exit heads) and their provenance.

Each embedded model ``NAME`` (:data:`splitinfer.models.EMBEDDED_MODELS`) ships ``NAME.safetensors`` (backbone),
``NAME_exits.safetensors`` (exit heads) and ``NAME.json`` (training command, figures, sha256 of both).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splitinfer.bundle import sha256_file
from splitinfer.errors import BundleError
from splitinfer.exits import ExitHead
from splitinfer.models import embedded_model
from splitinfer.staged import stage_model

BACKBONE_FILE = "default.safetensors"
EXITS_FILE = "default_exits.safetensors"
INFO_FILE = "default.json"


def weight_files(name: str) -> tuple[str, str, str]:
    """(backbone, exits, info) file names of embedded model ``name``."""
    stem = embedded_model(name).file_stem
    return f"{stem}.safetensors", f"{stem}_exits.safetensors", f"{stem}.json"


def weights_dir() -> Path:
    """The packaged weights directory (``splitinfer/weights``)."""
    return Path(str(resources.files("splitinfer").joinpath("weights")))


def save_default(out_dir: Path, model: torch.nn.Module, exits: dict[int, ExitHead], info: dict,
                 name: str = "default") -> None:
    """Write embedded model ``name``'s backbone, exits and provenance JSON (with sha256 of both weight files)."""
    backbone_file, exits_file, info_file = weight_files(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out_dir / backbone_file))
    save_file({f"{b}.{k}": v.detach().contiguous() for b, h in exits.items() for k, v in h.state_dict().items()},
              str(out_dir / exits_file))
    info = dict(info)
    info["exit_boundaries"] = sorted(exits)
    info["sha256"] = {f: sha256_file(out_dir / f) for f in (backbone_file, exits_file)}
    (out_dir / info_file).write_text(json.dumps(info, indent=2) + "\n")


def load_default(weights: Path | None = None, name: str = "default"):
    """Load the trained embedded model ``name`` (default: the default model), its staged form, exit heads and
    provenance info."""
    spec = embedded_model(name)
    backbone_file, exits_file, info_file = weight_files(name)
    d = Path(weights) if weights else weights_dir()
    info_path = d / info_file
    if not info_path.is_file():
        raise BundleError(f"no trained {name} weights in {d}; run `splitinfer plan train-embedded --model {name}`")
    info = json.loads(info_path.read_text())
    for f, digest in info.get("sha256", {}).items():
        if sha256_file(d / f) != digest:
            raise BundleError(f"{d / f} does not match the sha256 recorded in {info_file}")
    model = spec.build(10)
    model.load_state_dict(load_file(str(d / backbone_file)), strict=True)
    model.eval()
    staged = stage_model(model, spec.example())
    tensors = load_file(str(d / exits_file))
    exits = {}
    for b in info["exit_boundaries"]:
        head = ExitHead(staged.boundaries[b].shape, 10)
        head.load_state_dict({k[len(f"{b}."):]: v for k, v in tensors.items() if k.startswith(f"{b}.")}, strict=True)
        exits[b] = head.eval()
    return model, staged, exits, info
