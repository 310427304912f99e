"""Learned codecs for the default model: train the shipped bottleneck, load it, measure rate and accuracy.

The committed bottleneck lives beside the default weights (``splitinfer/weights/default_bottleneck.*``):
a safetensors file and a JSON with its configuration, provenance and sha256.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from partitioner.train import split_train_validation
from partitioner.weights import load_default, weights_dir
from splitinfer.bottleneck import Bottleneck, BottleneckConfig, DistillConfig, LearnedCodec, train_bottleneck
from splitinfer.bundle import sha256_file
from splitinfer.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, to_model_input
from splitinfer.errors import BundleError
from splitinfer.staged import StagedModel

BOTTLENECK_FILE = "default_bottleneck.safetensors"
BOTTLENECK_INFO = "default_bottleneck.json"


def default_train_images(data_dir: str | None = None, limit: int | None = None) -> torch.Tensor:
    """The default model's training split (validation images excluded), normalised."""
    _, _, _, info = load_default()
    train = load_fashion_mnist("train", data_dir)
    tr_idx, _ = split_train_validation(len(train), int(info["config"]["seed"]))
    if limit:
        tr_idx = tr_idx[:limit]
    return to_model_input(train.images[tr_idx], FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def test_images(data_dir: str | None = None, limit: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Fashion-MNIST test images (normalised) and labels."""
    test = load_fashion_mnist("test", data_dir)
    n = limit or len(test)
    return to_model_input(test.images[:n], FASHION_MNIST_MEAN, FASHION_MNIST_STD), test.labels[:n].astype(np.int64)


def save_bottleneck(out_dir: Path, bn: Bottleneck, report: dict) -> Path:
    """Write the bottleneck's tensors and a JSON with its config, report and sha256."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(bn.state_for_bundle(), str(out_dir / BOTTLENECK_FILE))
    info = dict(report)
    info["sha256"] = sha256_file(out_dir / BOTTLENECK_FILE)
    (out_dir / BOTTLENECK_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir / BOTTLENECK_FILE


def load_default_bottleneck(weights: Path | None = None) -> tuple[Bottleneck, dict]:
    """The committed bottleneck of the default model and its info; BundleError when absent or altered."""
    from safetensors.torch import load_file

    d = Path(weights) if weights else weights_dir()
    info_path = d / BOTTLENECK_INFO
    if not info_path.is_file():
        raise BundleError(f"no trained bottleneck in {d}; run `splitinfer plan train-bottleneck`")
    info = json.loads(info_path.read_text())
    if sha256_file(d / BOTTLENECK_FILE) != info.get("sha256"):
        raise BundleError(f"{d / BOTTLENECK_FILE} does not match the sha256 in {BOTTLENECK_INFO}")
    cfg = BottleneckConfig.from_params(info["config"])
    return Bottleneck.from_state(cfg, load_file(str(d / BOTTLENECK_FILE))), info


@dataclass
class CodecEval:
    """Rate and accuracy of one codec on a set of images (per offloaded sample)."""

    bytes_mean: float
    accuracy: float
    agreement: float
    reference_accuracy: float

    def to_dict(self) -> dict:
        return {"bytes_mean": round(self.bytes_mean, 2), "accuracy": round(self.accuracy, 5),
                "agreement": round(self.agreement, 5), "reference_accuracy": round(self.reference_accuracy, 5),
                "drop_points": round(100 * (self.reference_accuracy - self.accuracy), 3)}


@torch.inference_mode()
def evaluate_codec(staged: StagedModel, codec, boundary: int, x: torch.Tensor, y: np.ndarray,
                   batch: int = 500) -> CodecEval:
    """Encode every sample's boundary features on its own (as the edge does), decode, run the tail; compare
    with labels and with the uncompressed model."""
    n = staged.num_stages
    sizes, preds, refs = [], [], []
    for i in range(0, len(x), batch):
        f = staged.run(x[i : i + batch], 0, boundary)
        refs.append(staged.run(f.clone(), boundary, n).argmax(1))
        dec = []
        for j in range(len(f)):
            payload, meta = codec.encode(f[j : j + 1])
            sizes.append(len(payload))
            dec.append(codec.decode(payload, meta))
        preds.append(staged.run(torch.cat(dec), boundary, n).argmax(1))
    p, r = torch.cat(preds).numpy(), torch.cat(refs).numpy()
    return CodecEval(bytes_mean=float(np.mean(sizes)), accuracy=float((p == y).mean()),
                     agreement=float((p == r).mean()), reference_accuracy=float((r == y).mean()))


def train_default_bottleneck(boundary: int, channels: int, bits: int, dcfg: DistillConfig, hidden: int = 64,
                             stride: int = 2, coder: str = "ans", train_limit: int | None = None,
                             test_limit: int | None = None, data_dir: str | None = None,
                             progress: bool = True) -> tuple[Bottleneck, dict]:
    """Train a bottleneck for the committed default model and evaluate it on the test set."""
    _, staged, _, _ = load_default()
    x_tr = default_train_images(data_dir, train_limit)
    cfg = BottleneckConfig(boundary=boundary, in_shape=tuple(staged.boundaries[boundary].shape), channels=channels,
                           bits=bits, stride=stride, hidden=hidden, coder=coder)
    t0 = time.perf_counter()
    bn, report = train_bottleneck(staged, cfg, x_tr, dcfg, progress=progress)
    x_te, y_te = test_images(data_dir, test_limit)
    ev = evaluate_codec(staged, LearnedCodec(bn), boundary, x_te, y_te)
    report["test"] = ev.to_dict()
    report["test_images"] = len(x_te)
    report["fp32_bytes"] = staged.boundaries[boundary].fp32_bytes
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["torch"] = torch.__version__
    return bn, report
