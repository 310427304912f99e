"""Shared fixtures: a small bundle built from the untrained default model, and free loopback ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from splitinfer.bundle import CodecSpec, ExitSpec, InputSpec, new_plan, save_bundle
from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from splitinfer.exits import ExitHead
from splitinfer.models import build_default
from splitinfer.staged import stage_model

TEST_SPLIT = 9  # boundary after the second downsampling block: [96, 7, 7]
TEST_EXITS = (4, 8)  # boundaries [48, 14, 14] (after the first downsampling) and after the first residual block


def make_test_bundle(path: Path, split: int = TEST_SPLIT, thresholds: tuple[float, float] = (0.5, 0.5),
                     seed: int = 0) -> Path:
    """A real bundle of the default architecture with random (seeded) weights and two exits."""
    torch.manual_seed(seed)
    model = build_default().eval()
    staged = stage_model(model, torch.zeros(1, 1, 28, 28))
    exits = {b: ExitHead(staged.boundaries[b].shape, 10).eval() for b in TEST_EXITS}
    plan = new_plan(
        "default", staged,
        InputSpec(shape=[1, 28, 28], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD], labels=FASHION_MNIST_CLASSES),
        split=split, codec=CodecSpec(name="uint8-affine"),
        exits=[ExitSpec(boundary=b, threshold=t) for b, t in zip(TEST_EXITS, thresholds, strict=True)],
    )
    return save_bundle(path, plan, model, exits)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """Session-wide test bundle (random weights, split 9, exits at 4 and 8 with threshold 0.5)."""
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "default")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a currently free TCP port on 127.0.0.1."""
    return _free_port
