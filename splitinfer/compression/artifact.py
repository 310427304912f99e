"""A compressed model on disk, and how a bundle carries one.

``plan compress --out DIR`` writes::

    DIR/model.safetensors   the weights: coded layers as symbols + codebooks (``splitinfer.compression.coding``),
                            everything else float32; a sha256 over contents and metadata inside
    DIR/compression.json    base model, method, structure recipe (factorized layers), figures, command, and the
                            file's sha256

A bundle planned from it (``plan make --compressed DIR``) copies ``model.safetensors`` unchanged and records
the recipe in ``plan.json`` (``model.compression``); :func:`rebuild` turns architecture + recipe + file back into
the model, bit-exact to the one evaluated. No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from torch import nn

from splitinfer.compression.coding import decode_state, encode_state, is_coded
from splitinfer.compression.lowrank import apply_structure
from splitinfer.compression.prune import replay
from splitinfer.errors import BundleError

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "compression.json"
ARTIFACT_FORMAT = "splitinfer-compressed-model-v1"


def weights_bytes(model: nn.Module, coded: dict) -> bytes:
    """The model's state as a coded-weights safetensors file (coded layers as symbols)."""
    return encode_state(model.state_dict(), coded)


def recipe_of(info: dict) -> dict:
    """What a bundle needs to rebuild the model: method and structure (the ``model.compression`` of a plan)."""
    return {"format": ARTIFACT_FORMAT, "method": info["method"], "structure": info.get("structure", []),
            "base_model": info["base_model"]}


def save(out: Path, base_model: str, compressed, figures: dict, command: str) -> dict:
    """Write a compressed model directory (``compressed``: a :class:`~splitinfer.compression.methods.Compressed`)."""
    import hashlib

    out.mkdir(parents=True, exist_ok=True)
    data = weights_bytes(compressed.model, compressed.coded)
    (out / WEIGHTS_FILE).write_bytes(data)
    info = {"format": ARTIFACT_FORMAT, "base_model": base_model, "method": compressed.method,
            "structure": compressed.structure, "coded_layers": sorted(compressed.coded), "stored_bytes": len(data),
            "command": command, "figures": figures, "report": compressed.report,
            "sha256": {WEIGHTS_FILE: hashlib.sha256(data).hexdigest()}}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=float) + "\n")
    return info


def read_info(path: Path) -> dict:
    """``compression.json`` of a compressed model directory (checked: format, weights file hash)."""
    import hashlib

    fp = Path(path) / INFO_FILE
    if not fp.is_file():
        raise BundleError(f"{path} is not a compressed model directory (no {INFO_FILE}; write one with "
                          "`splitinfer plan compress`)")
    try:
        info = json.loads(fp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{fp} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != ARTIFACT_FORMAT:
        raise BundleError(f"{fp}: format {info.get('format') if isinstance(info, dict) else None!r}, this build reads "
                          f"{ARTIFACT_FORMAT}")
    wp = Path(path) / WEIGHTS_FILE
    if not wp.is_file():
        raise BundleError(f"{path} has no {WEIGHTS_FILE}")
    if hashlib.sha256(wp.read_bytes()).hexdigest() != info.get("sha256", {}).get(WEIGHTS_FILE):
        raise BundleError(f"{wp} does not match the sha256 in {INFO_FILE} (corrupted or replaced)")
    return info


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """A state dict from a weights file: decoded when coded, read as plain safetensors otherwise."""
    if is_coded(data):
        return decode_state(data)
    try:
        return safetensors_load(data)
    except Exception as exc:  # safetensors raises several types on garbage
        raise BundleError(f"cannot read the weights as safetensors (corrupted?): {exc}") from None


def rebuild(model: nn.Module, recipe: dict | None, data: bytes, example: torch.Tensor | None = None) -> nn.Module:
    """``model`` (the base architecture, fresh) with the recipe's structure and the file's weights loaded
    (``example``: an input, needed to replay structured pruning)."""
    if recipe:
        if recipe.get("format") != ARTIFACT_FORMAT:
            raise BundleError(f"compression recipe format {recipe.get('format')!r}, this build reads {ARTIFACT_FORMAT}")
        structure = recipe.get("structure", [])
        try:
            pruned = [e for e in structure if e.get("kind") == "prune"]
            if pruned:
                if example is None:
                    raise ValueError("replaying structured pruning needs an example input")
                replay(model, example, pruned)
            apply_structure(model, [e for e in structure if e.get("kind") != "prune"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"compression recipe does not fit the model: {exc}") from None
    state = state_from_bytes(data)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"compressed weights do not fit the model: {exc}") from None
    return model.eval()


def load(path: Path, build, example: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """The compressed model in directory ``path`` (``build(base_model_name)`` makes the fresh architecture) and
    its info; ``example`` (an input) defaults to the embedded base model's."""
    from splitinfer.models import EMBEDDED_MODELS

    info = read_info(path)
    model = build(info["base_model"])
    if example is None and info["base_model"] in EMBEDDED_MODELS:
        example = EMBEDDED_MODELS[info["base_model"]].example()
    return rebuild(model, recipe_of(info), (Path(path) / WEIGHTS_FILE).read_bytes(), example), info
