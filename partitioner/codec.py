"""Learned bottleneck codecs for any staged model: teachers, training and test data, the bottleneck directory
format and its loader with checks. Training at several boundaries within a time budget
(:func:`~splitinfer.bottleneck.train_bottlenecks`) and evaluation (:func:`~splitinfer.bottleneck.evaluate_codec`:
bytes, accuracy, agreement) live in :mod:`splitinfer.bottleneck` and are re-exported here.

A bottleneck directory holds, per boundary ``B`` of a model, ``<stem>_bottleneck_<B>.safetensors`` (weights,
quantizer ranges, symbol tables) and ``<stem>_bottleneck_<B>.json`` (configuration, training report with test
figures, the command, seed, the model and whether its weights were committed, a checkpoint or random, and the
sha256 of the safetensors file). ``stem`` is an embedded model's file stem (``default``,
``mobilenet_v2_fmnist``), else the model's name with characters other than letters, digits, ``.``, ``_`` and
``-`` replaced by ``_``. The embedded models' bottlenecks live beside their weights (``splitinfer/weights``).
The codec committed before this format, ``default_bottleneck.safetensors/.json``, is still read (as the
default model's bottleneck at the boundary its JSON names).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from partitioner.train import TrainConfig, split_train_validation
from partitioner.weights import load_default, weights_dir
from splitinfer.bottleneck import (  # noqa: F401  (CodecEval, evaluate_codec, ... are re-exported here)
    TRAINED_WEIGHTS,
    Bottleneck,
    BottleneckConfig,
    CodecEval,
    DistillConfig,
    agreement_note,
    bottleneck_boundaries,
    check_boundaries,
    evaluate_codec,
    train_bottlenecks,
)
from splitinfer.bundle import is_safetensors, sha256_file
from splitinfer.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    load_image_folder,
    render,
    to_model_input,
)
from splitinfer.errors import BundleError, DataError
from splitinfer.plan import InputSpec
from splitinfer.staged import StagedModel

BOTTLENECK_FILE = "default_bottleneck.safetensors"  # the name the default model's codec was committed under
BOTTLENECK_INFO = "default_bottleneck.json"
DEFAULT_BOUNDARY = 6  # the default model's committed bottleneck (48x14x14)
FORMAT = "splitinfer-bottleneck"
HELD_OUT = 0.2  # share of an image folder held out as test images


# ---------------------------------------------------------------------------------------------- data


class NormalisedImages:
    """uint8 images ``[N, H, W]`` (grey) or ``[N, H, W, C]`` that index like a normalised float tensor
    ``[N, channels, H, W]``: slices and index arrays/tensors give tensors normalised batch by batch (a grey
    image is replicated to every channel of a ``channels``-channel model), so a large training set is held as
    bytes, not floats."""

    def __init__(self, images: np.ndarray, mean: Sequence[float], std: Sequence[float]):
        if images.ndim not in (3, 4):
            raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got {images.shape}")
        self.images = images
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.channels = len(self.mean)
        if images.ndim == 4 and images.shape[3] != self.channels:
            raise ValueError(f"images have {images.shape[3]} channels, the model takes {self.channels}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.images), self.channels, int(self.images.shape[1]), int(self.images.shape[2]))

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        batch = self.images[idx]
        if isinstance(idx, (int, np.integer)):
            batch = batch[None]
        # normalise() gives [B, 1, H, W] for grey images; the per-channel mean/std broadcast it to every channel
        x = to_model_input(batch, self.mean, self.std)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x


def _spec_channels(spec: InputSpec, source: str) -> int:
    c = int(spec.shape[0])
    if c not in (1, 3):
        raise ValueError(f"{source} can feed models with 1 (grey) or 3 (RGB) input channels, not {c}")
    return c


def fashion_mnist_inputs(split: str, spec: InputSpec, *, seed: int, limit: int | None = None,
                         data_dir: str | None = None) -> tuple[NormalisedImages, np.ndarray]:
    """Fashion-MNIST rendered at the input spec's size, grey (replicated to 3 channels for an RGB model) and
    normalised with its mean and std, with the labels. ``train``: the training split without the validation
    images of ``seed`` (:func:`~partitioner.train.split_train_validation`), first ``limit``; ``test``: the
    test set's first ``limit``."""
    _spec_channels(spec, "Fashion-MNIST")
    data = load_fashion_mnist(split, data_dir)
    if split == "train":
        idx, _ = split_train_validation(len(data), seed)
    else:
        idx = np.arange(len(data))
    if limit:
        idx = idx[:limit]
    _, h, w = (int(d) for d in spec.shape)
    return NormalisedImages(render(data.images[idx], (h, w)), spec.mean, spec.std), data.labels[idx].astype(np.int64)


@dataclass
class FolderSplit:
    """An image folder split into training and held-out test images (labels mapped to the model's classes
    where the folder's class names are among them, else None)."""

    x_train: NormalisedImages
    x_test: NormalisedImages
    y_test: np.ndarray | None
    classes: list[str]
    note: str


def image_folder_inputs(root: str | Path, spec: InputSpec, *, seed: int, train_limit: int | None = None,
                        test_limit: int | None = None) -> FolderSplit:
    """``root/<class>/<image>`` resized to the input spec's size (grey or RGB as it takes) and normalised; a
    seeded random 20 % (at least one image, at most ``test_limit``) is held out as the test set, the rest
    (at most ``train_limit``) trains. Test labels are kept only when every folder class names one of the
    model's labels (mapped by name)."""
    c = _spec_channels(spec, "an image folder")
    _, h, w = (int(d) for d in spec.shape)
    data = load_image_folder(root, size=(h, w), grayscale=c == 1)
    n = len(data)
    if n < 2:
        raise DataError(f"image folder {root} holds {n} image(s); at least 2 are needed (train and test)")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(HELD_OUT * n)))
    te, tr = perm[:n_test], perm[n_test:]
    if test_limit:
        te = te[:test_limit]
    if train_limit:
        tr = tr[:train_limit]
    te, tr = np.sort(te), np.sort(tr)
    y_test = None
    note = f"image folder {root}: {len(tr)} training and {len(te)} held-out test images"
    if set(data.classes) <= set(spec.labels):
        to_model = np.asarray([spec.labels.index(name) for name in data.classes], dtype=np.int64)
        y_test = to_model[data.labels[te]]
    else:
        note += "; its class names are not the model's labels, so no accuracy (agreement only)"
    return FolderSplit(NormalisedImages(data.images[tr], spec.mean, spec.std),
                       NormalisedImages(data.images[te], spec.mean, spec.std), y_test, data.classes, note)


def default_train_images(data_dir: str | None = None, limit: int | None = None) -> torch.Tensor:
    """The default model's training split (validation images excluded), normalised."""
    _, _, _, info = load_default()
    train = load_fashion_mnist("train", data_dir)
    tr_idx, _ = split_train_validation(len(train), int(info["config"]["seed"]))
    if limit:
        tr_idx = tr_idx[:limit]
    return to_model_input(train.images[tr_idx], FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def test_images(data_dir: str | None = None, limit: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Fashion-MNIST test images (normalised, 28x28) and labels."""
    test = load_fashion_mnist("test", data_dir)
    n = limit or len(test)
    return to_model_input(test.images[:n], FASHION_MNIST_MEAN, FASHION_MNIST_STD), test.labels[:n].astype(np.int64)


# ---------------------------------------------------------------------------------------------- teachers


@dataclass
class Teacher:
    """The frozen model a bottleneck is distilled from.

    ``weights``: ``committed`` (an embedded model's committed weights), ``checkpoint`` (a safetensors file),
    ``random`` (a torchvision model without one: its answers mean nothing) or ``unknown`` (whatever a user's
    factory returns)."""

    name: str
    staged: StagedModel
    input_spec: InputSpec
    weights: str
    stem: str
    embedded: bool
    weights_sha256: str | None = None
    seed: int = TrainConfig.seed  # the Fashion-MNIST train/validation split's seed

    @property
    def trained(self) -> bool:
        """True when the teacher's answers can be scored against labels."""
        return self.weights in TRAINED_WEIGHTS


def bottleneck_stem(model: str) -> str:
    """The file stem of ``model``'s bottleneck files (see the module docstring)."""
    from splitinfer.models import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model].file_stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model)


def load_teacher(model: str, checkpoint: Path | None = None, input_shape: list[int] | None = None,
                 weights: Path | None = None) -> Teacher:
    """Load ``model``: an embedded model (its committed weights from ``weights`` or the packaged directory;
    BundleError when there are none), a torchvision name (random weights unless ``checkpoint``) or a user's
    ``module:factory`` (``input_shape`` required); see :func:`partitioner.target.load_target`."""
    from splitinfer.models import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        if checkpoint is not None:
            raise ValueError(f"{model} is an embedded model: it uses its committed weights (train others with "
                             "`splitinfer plan train-embedded`); --checkpoint is for torchvision and user models")
        if input_shape is not None:
            raise ValueError(f"{model} is an embedded model with a fixed input; --input-shape is for other models")
        spec = EMBEDDED_MODELS[model]
        _, staged, _, info = load_default(weights, model)
        ispec = InputSpec(shape=[1, spec.size, spec.size], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
                          labels=list(FASHION_MNIST_CLASSES))
        digest = info.get("sha256", {}).get(f"{spec.file_stem}.safetensors")
        return Teacher(model, staged, ispec, "committed", spec.file_stem, True, digest,
                       int(info.get("config", {}).get("seed", TrainConfig.seed)))
    from partitioner.target import load_target

    target = load_target(model, checkpoint, input_shape)
    digest = sha256_file(Path(checkpoint)) if checkpoint is not None else None
    return Teacher(model, target.staged, target.input_spec, target.weights_source, bottleneck_stem(model), False,
                   digest)


# ---------------------------------------------------------------------------------------------- training


def train_default_bottleneck(boundary: int, channels: int, bits: int, dcfg: DistillConfig, hidden: int = 64,
                             stride: int = 2, coder: str = "ans", train_limit: int | None = None,
                             test_limit: int | None = None, data_dir: str | None = None,
                             progress: bool = True) -> tuple[Bottleneck, dict]:
    """Train a bottleneck for the committed default model and evaluate it on the test set (one boundary, every
    size given; :func:`train_bottlenecks` is the general form)."""
    _, staged, _, _ = load_default()
    x_tr = default_train_images(data_dir, train_limit)
    x_te, y_te = test_images(data_dir, test_limit)
    (bn, report), = train_bottlenecks(staged, [boundary], x_tr, x_te, y_te, bits=bits, coder=coder,
                                      channels=channels, hidden=hidden, stride=stride, dcfg=dcfg,
                                      model="default", progress=progress)
    return bn, report


# ---------------------------------------------------------------------------------------------- storage


def bottleneck_files(stem: str, boundary: int) -> tuple[str, str]:
    """(weights, info) file names of a bottleneck at ``boundary`` for models with file stem ``stem``."""
    return f"{stem}_bottleneck_{boundary}.safetensors", f"{stem}_bottleneck_{boundary}.json"


def save_bottleneck(out_dir: Path, bn: Bottleneck, report: dict, stem: str = "default") -> Path:
    """Write ``<stem>_bottleneck_<B>.safetensors`` and ``.json`` (the report, with the format name and the
    sha256 of the weights) into ``out_dir``; returns the weights' path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_file, info_file = bottleneck_files(stem, bn.cfg.boundary)
    save_file(bn.state_for_bundle(), str(out_dir / weights_file))
    info = {"format": FORMAT, **report, "config": bn.cfg.to_params()}
    info["sha256"] = sha256_file(out_dir / weights_file)
    (out_dir / info_file).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir / weights_file


def _bottleneck_infos(directory: Path, stem: str) -> dict[int, tuple[Path, Path]]:
    """Boundary -> (weights, info) paths of ``stem``'s bottlenecks in ``directory``; the legacy
    ``<stem>_bottleneck.json`` counts at the boundary its config names unless a new file has that boundary."""
    found: dict[int, tuple[Path, Path]] = {}
    pattern = re.compile(rf"^{re.escape(stem)}_bottleneck_(\d+)\.json$")
    for p in sorted(directory.iterdir()):
        match = pattern.match(p.name)
        if match:
            found[int(match.group(1))] = (p.with_suffix(".safetensors"), p)
    legacy = directory / f"{stem}_bottleneck.json"
    if legacy.is_file():
        try:
            b = int(json.loads(legacy.read_text())["config"]["boundary"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{legacy} is not a bottleneck description: {exc}") from exc
        found.setdefault(b, (legacy.with_suffix(".safetensors"), legacy))
    return found


def _model_staged(model: str, input_shape: list[int] | None) -> StagedModel:
    """``model``'s staged form for shape checks (untrained weights: only the shapes are used)."""
    from splitinfer.models import EMBEDDED_MODELS
    from splitinfer.staged import stage_model

    if model in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[model]
        return stage_model(spec.build(10).eval(), spec.example())
    from partitioner.target import load_target

    return load_target(model, None, input_shape).staged


def load_bottlenecks(directory: str | Path, model_name: str, staged: StagedModel | None = None,
                     ) -> dict[int, tuple[Bottleneck, dict]]:
    """Every bottleneck of model ``model_name`` in ``directory``, by boundary: ``{B: (bottleneck, info)}``
    (empty when there is none).

    BundleError when the directory is missing, a weights file is absent, not a safetensors file or does not
    match the sha256 in its JSON, a JSON names another model or another boundary than its file name, or a
    config's ``in_shape`` is not the model's feature shape at that boundary (checked against ``staged`` when
    given, else against the model built from its name: an embedded model, a torchvision name at the input
    shape the JSON records, or a ``module:factory``).
    """
    from safetensors.torch import load_file

    d = Path(directory)
    if not d.is_dir():
        raise BundleError(f"bottleneck directory {d} does not exist")
    stem = bottleneck_stem(model_name)
    out: dict[int, tuple[Bottleneck, dict]] = {}
    for b, (weights_path, info_path) in sorted(_bottleneck_infos(d, stem).items()):
        try:
            info = json.loads(info_path.read_text())
            cfg = BottleneckConfig.from_params(info["config"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{info_path} is not a valid bottleneck description: {exc}") from exc
        if info.get("model", model_name) != model_name:
            raise BundleError(f"{info_path} holds a bottleneck of model {info['model']!r}, not {model_name!r}")
        if cfg.boundary != b:
            raise BundleError(f"{info_path} names boundary {cfg.boundary}, its file name boundary {b}")
        if not weights_path.is_file():
            raise BundleError(f"{weights_path} is missing (described by {info_path.name})")
        if not is_safetensors(weights_path):
            raise BundleError(f"{weights_path} is not a safetensors file; other formats (pickles) are refused")
        if sha256_file(weights_path) != info.get("sha256"):
            raise BundleError(f"{weights_path} does not match the sha256 in {info_path.name}")
        if staged is None:
            staged = _model_staged(model_name, info.get("input_shape"))
        if not 0 < b < staged.num_stages or list(staged.boundaries[b].shape) != list(cfg.in_shape):
            have = list(staged.boundaries[b].shape) if 0 <= b <= staged.num_stages else "nothing"
            raise BundleError(f"{info_path.name}: the bottleneck takes {list(cfg.in_shape)} features at boundary "
                              f"{b}, but {model_name}'s boundary {b} is {have} (another model or input shape?)")
        try:
            bn = Bottleneck.from_state(cfg, load_file(str(weights_path)))
        except (RuntimeError, ValueError) as exc:
            raise BundleError(f"{weights_path} does not fit its config {cfg.to_params()}: {exc}") from exc
        out[b] = (bn, info)
    return out


def load_default_bottleneck(weights: Path | None = None, boundary: int | None = None) -> tuple[Bottleneck, dict]:
    """The default model's committed bottleneck and its info (:func:`load_bottlenecks` on the packaged
    weights, or ``weights``): the one at ``boundary``, by default at :data:`DEFAULT_BOUNDARY` when there is one
    there, else the lowest boundary's. Reads both ``default_bottleneck_<B>.*`` and the older
    ``default_bottleneck.*``. BundleError when absent or altered."""
    d = Path(weights) if weights else weights_dir()
    found = load_bottlenecks(d, "default") if d.is_dir() else {}
    if not found:
        raise BundleError(f"no trained bottleneck of the default model in {d}; run "
                          "`splitinfer plan train-bottleneck`")
    if boundary is None:
        boundary = DEFAULT_BOUNDARY if DEFAULT_BOUNDARY in found else min(found)
    if boundary not in found:
        raise BundleError(f"no bottleneck of the default model at boundary {boundary} in {d} "
                          f"(there are: {', '.join(map(str, sorted(found)))})")
    return found[boundary]


def describe_eval(report: dict) -> str:
    """One line of test figures for a bottleneck report (what :func:`train_bottlenecks` writes)."""
    t = report["test"]
    ratio = report["fp32_bytes"] / t["bytes_mean"] if t["bytes_mean"] else math.inf
    line = f"{t['bytes_mean']:.1f} B/sample ({ratio:.0f}x below float32), "
    if "accuracy" in t:
        line += (f"test accuracy {t['accuracy']:.4f} (uncompressed {t['reference_accuracy']:.4f}, drop "
                 f"{t['drop_points']:.2f} points), agreement {t['agreement']:.4f}")
    elif report.get("teacher_weights") == "random":
        line += f"agreement with a random teacher {t['agreement']:.4f} (not accuracy: the model has random weights)"
    elif report.get("teacher_weights") not in TRAINED_WEIGHTS:
        line += f"agreement with the model's own answers {t['agreement']:.4f} (not accuracy: weights of unknown origin)"
    else:
        line += f"agreement {t['agreement']:.4f} (no labels: no accuracy)"
    return line
