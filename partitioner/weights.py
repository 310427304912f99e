"""The committed weights of the embedded default model (backbone and exit heads) and their provenance."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splitinfer.bundle import sha256_file
from splitinfer.errors import BundleError
from splitinfer.exits import ExitHead
from splitinfer.models import build_default
from splitinfer.staged import stage_model

BACKBONE_FILE = "default.safetensors"
EXITS_FILE = "default_exits.safetensors"
INFO_FILE = "default.json"


def weights_dir() -> Path:
    """The packaged weights directory (``splitinfer/weights``)."""
    return Path(str(resources.files("splitinfer").joinpath("weights")))


def save_default(out_dir: Path, model: torch.nn.Module, exits: dict[int, ExitHead], info: dict) -> None:
    """Write backbone, exits and the provenance JSON (with sha256 of both weight files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out_dir / BACKBONE_FILE))
    save_file({f"{b}.{k}": v.detach().contiguous() for b, h in exits.items() for k, v in h.state_dict().items()},
              str(out_dir / EXITS_FILE))
    info = dict(info)
    info["exit_boundaries"] = sorted(exits)
    info["sha256"] = {f: sha256_file(out_dir / f) for f in (BACKBONE_FILE, EXITS_FILE)}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_default(weights: Path | None = None):
    """Load the trained default model, its staged form, exit heads and provenance info."""
    d = Path(weights) if weights else weights_dir()
    info_path = d / INFO_FILE
    if not info_path.is_file():
        raise BundleError(f"no trained default weights in {d}; run `splitinfer plan train-default`")
    info = json.loads(info_path.read_text())
    for f, digest in info.get("sha256", {}).items():
        if sha256_file(d / f) != digest:
            raise BundleError(f"{d / f} does not match the sha256 recorded in {INFO_FILE}")
    model = build_default()
    model.load_state_dict(load_file(str(d / BACKBONE_FILE)), strict=True)
    model.eval()
    staged = stage_model(model, torch.zeros(1, 1, 28, 28))
    tensors = load_file(str(d / EXITS_FILE))
    exits = {}
    for b in info["exit_boundaries"]:
        head = ExitHead(staged.boundaries[b].shape, 10)
        head.load_state_dict({k[len(f"{b}."):]: v for k, v in tensors.items() if k.startswith(f"{b}.")}, strict=True)
        exits[b] = head.eval()
    return model, staged, exits, info
