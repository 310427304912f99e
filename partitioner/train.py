"""Training of the embedded models on Fashion-MNIST (``splitinfer plan train-embedded``, ``train-default``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from splitinfer.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, render, to_model_input
from splitinfer.models import embedded_model
from splitinfer.progress import progress_bar

VALIDATION_SIZE = 5000  # carved from the training set (never the test set); used to pick exit thresholds


@dataclass
class TrainConfig:
    """Hyper-parameters of ``plan train-embedded``; with the model's epochs they reproduce the committed weights."""

    epochs: int = 9
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum 0.9) or "adamw"
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 20261122
    threads: int = 2
    train_limit: int | None = None  # use only the first N training images (for quick tests)
    test_limit: int | None = None

    @classmethod
    def for_model(cls, name: str, **overrides) -> TrainConfig:
        """The settings that reproduce embedded model ``name``'s committed weights (its epochs and its
        ``train_settings``, e.g. vit_fmnist's AdamW), then ``overrides`` (``None`` values are ignored)."""
        spec = embedded_model(name)
        settings = {"epochs": spec.epochs, **dict(spec.train_settings)}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**settings)


def split_train_validation(n: int, seed: int, validation: int = VALIDATION_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of training indices into (train, validation)."""
    perm = np.random.default_rng(seed).permutation(n)
    validation = min(validation, n // 5)
    return np.sort(perm[validation:]), np.sort(perm[:validation])


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on tensors ``x``/``y``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / max(1, len(x))


def model_input(images: np.ndarray, size: int) -> torch.Tensor:
    """Fashion-MNIST uint8 images rendered at ``size`` and normalised: an embedded model's input."""
    return to_model_input(render(images, size), FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def train_embedded(name: str, cfg: TrainConfig | None = None, data_dir: str | None = None,
                   progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train the embedded model ``name`` on Fashion-MNIST rendered at its input size; returns the model and a
    report (accuracies, time, config). Without ``cfg``: :meth:`TrainConfig.for_model` (the committed recipe)."""
    spec = embedded_model(name)
    cfg = cfg or TrainConfig.for_model(name)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train = load_fashion_mnist("train", data_dir)
    test = load_fashion_mnist("test", data_dir)
    tr_idx, va_idx = split_train_validation(len(train), cfg.seed)
    if cfg.train_limit:
        tr_idx = tr_idx[: cfg.train_limit]
    x_tr = model_input(train.images[tr_idx], spec.size)
    y_tr = torch.from_numpy(train.labels[tr_idx])
    x_va = model_input(train.images[va_idx], spec.size)
    y_va = torch.from_numpy(train.labels[va_idx])
    test_n = cfg.test_limit or len(test)
    x_te = model_input(test.images[:test_n], spec.size)
    y_te = torch.from_numpy(test.labels[:test_n])
    pad = max(2, round(2 * spec.size / 28))  # the same translation, in source pixels, at every rendering

    model = spec.build(len(train.classes)).to(memory_format=torch.channels_last)
    steps_per_epoch = (len(x_tr) + cfg.batch_size - 1) // cfg.batch_size
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                                                pct_start=0.2)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        bar = progress_bar(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=progress,
                           leave=False)
        total = 0.0
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = augment(x_tr[idx], gen, pad).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total / (step + 1):.3f}")
        va = evaluate(model, x_va, y_va)
        history.append({"epoch": epoch + 1, "loss": total / steps_per_epoch, "val_acc": va})
        if progress:
            bar.write(f"epoch {epoch + 1}: loss {total / steps_per_epoch:.4f}  val acc {va:.4f}")
    model = model.to(memory_format=torch.contiguous_format).eval()
    report = {
        "model": name,
        "input_size": spec.size,
        "config": asdict(cfg),
        "train_images": len(x_tr),
        "validation_images": len(x_va),
        "validation_accuracy": evaluate(model, x_va, y_va),
        "test_images": len(x_te),
        "test_accuracy": evaluate(model, x_te, y_te),
        "train_seconds": round(time.perf_counter() - start, 1),
        "history": history,
        "torch": torch.__version__,
    }
    return model, report


def save_report(report: dict, path: str | Path) -> None:
    """Write the training report as JSON."""
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
