"""``plan compress``: compress an embedded model with one method and write it for ``plan make --compressed``.

Data: the Fashion-MNIST training split the model was trained on (validation images excluded; labels used
beside the teacher's outputs), 2,000 of the validation images for the sensitivity measurements of the
automated policies, and the test set for the figures written beside the weights.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from partitioner.train import model_input, split_train_validation
from partitioner.weights import load_default
from splitinfer.compression import artifact
from splitinfer.compression.layers import accuracy, state_bytes
from splitinfer.compression.methods import Compressed, Data, Options, compress
from splitinfer.data import load_fashion_mnist
from splitinfer.models import embedded_model
from splitinfer.timing import alternate


def training_data(model_name: str, data_dir: str | None = None, train_limit: int | None = None,
                  val_images: int = 2000):
    """(model, staged, x_train, y_train, x_val, x_test, y_test) of an embedded model."""
    net, staged, _exits, info = load_default(None, model_name)
    size = embedded_model(model_name).size
    train = load_fashion_mnist("train", data_dir)
    tr_idx, va_idx = split_train_validation(len(train), int(info["config"]["seed"]))
    if train_limit:
        tr_idx = tr_idx[:train_limit]
    test = load_fashion_mnist("test", data_dir)
    y = torch.as_tensor(train.labels[tr_idx].astype(np.int64))
    return (net, staged, model_input(train.images[tr_idx], size), y,
            model_input(train.images[va_idx[:val_images]], size), model_input(test.images, size),
            torch.as_tensor(test.labels.astype(np.int64)))


def alternate_latency(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, rounds: int = 5,
                      runs: int = 100) -> tuple[float, float]:
    """Median latency (ms) of two modules on ``x``, 1 thread, in alternating rounds (:func:`splitinfer.timing.
    alternate`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return alternate(lambda: a(x), lambda: b(x), rounds, runs)
    finally:
        torch.set_num_threads(threads)


def figures(base: torch.nn.Module, result: Compressed, x_test: torch.Tensor, y_test: torch.Tensor,
            stored_bytes: int, rounds: int = 5) -> dict:
    """Test accuracy before/after, storage and MAC figures of a compressed model, and its batch-1 latency next
    to fp32's (1 thread, alternating)."""
    acc0, acc1 = accuracy(base, x_test, y_test), accuracy(result.model, x_test, y_test)
    fp32 = state_bytes(base)
    coded_layers = sum(c.symbols.numel() for c in result.coded.values())
    return {"test_images": len(x_test), "test_accuracy_fp32": round(acc0, 4), "test_accuracy": round(acc1, 4),
            "drop_points": round(100 * (acc0 - acc1), 2), "fp32_bytes": fp32, "stored_bytes": stored_bytes,
            "storage_ratio": round(fp32 / stored_bytes, 3), "coded_weights": int(coded_layers),
            "macs_fp32": result.report["macs_before"], "macs": result.report["macs_after"],
            "mac_reduction": round(1 - result.report["macs_after"] / result.report["macs_before"], 4),
            **_latency(base, result.model, x_test[:1], rounds)}


def _latency(base: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict:
    a, b = alternate_latency(base, model, x, rounds)
    return {"fp32_latency_ms": round(a, 4), "latency_ms": round(b, 4), "speedup": round(a / b, 3)}


def compress_embedded(model_name: str, method: str, out: Path, opts: Options, train_limit: int | None = None,
                      data_dir: str | None = None, threads: int | None = None, val_images: int = 2000) -> dict:
    """Compress embedded model ``model_name`` with ``method``, evaluate it on the test set and write ``out``."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(opts.seed)
    net, _staged, x, y, x_val, x_test, y_test = training_data(model_name, data_dir, train_limit, val_images)
    result = compress(net, embedded_model(model_name).example(), method, Data.of(net, x, y, x_val), opts)
    data = artifact.weights_bytes(result.model, result.coded)
    figs = figures(net, result, x_test, y_test, len(data))
    command = "splitinfer " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    return artifact.save(Path(out), model_name, result, figs, command)
