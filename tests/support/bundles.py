"""Small real bundles of the default architecture with random (seeded) weights, built in seconds."""

from __future__ import annotations

from pathlib import Path

import torch

from splitinfer.bundle import CodecSpec, ExitSpec, InputSpec, new_plan, save_bundle
from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from splitinfer.exits import ExitHead
from splitinfer.models import build_default
from splitinfer.staged import stage_model

TEST_SPLIT = 9  # boundary after the second downsampling block: [96, 7, 7]
TEST_EXITS = (4, 8)  # boundaries [48, 14, 14] (after the first downsampling) and after the first residual block
LEARNED_SPLIT = 8  # boundary [48, 14, 14] after the first residual block
MULTI_CODEC_BOUNDARIES = (3, 6)  # the committed default model's [32, 28, 28] and [48, 14, 14] boundaries


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


def make_learned_bundle(path: Path, seed: int = 0, coder: str = "ans") -> Path:
    """A bundle of the default architecture (random weights) whose split uses a learned bottleneck codec.

    The bottleneck is not trained (no time in unit tests) but is fully calibrated: quantizer ranges and
    probability tables are fitted on random inputs, exactly as after training.
    """
    from splitinfer.bottleneck import BottleneckConfig, DistillConfig, train_bottleneck

    torch.manual_seed(seed)
    model = build_default().eval()
    staged = stage_model(model, torch.zeros(1, 1, 28, 28))
    exits = {4: ExitHead(staged.boundaries[4].shape, 10).eval()}
    cfg = BottleneckConfig(boundary=LEARNED_SPLIT, in_shape=tuple(staged.boundaries[LEARNED_SPLIT].shape),
                           channels=4, bits=3, hidden=16, coder=coder)
    bn, _ = train_bottleneck(staged, cfg, torch.randn(64, 1, 28, 28), DistillConfig(epochs_float=0, epochs_qat=0),
                             progress=False)
    plan = new_plan(
        "default", staged,
        InputSpec(shape=[1, 28, 28], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD], labels=FASHION_MNIST_CLASSES),
        split=LEARNED_SPLIT, codec=CodecSpec(name="bottleneck"),
        learned_codecs=[CodecSpec(name="bottleneck", params=cfg.to_params())],
        exits=[ExitSpec(boundary=4, threshold=0.999)],
    )
    return save_bundle(path, plan, model, exits, codec_states={LEARNED_SPLIT: bn.state_for_bundle()})


def make_multi_codec_bundle(path: Path, boundaries: tuple[int, ...] = MULTI_CODEC_BOUNDARIES,
                            split: int | None = None, seed: int = 0) -> Path:
    """A bundle of the committed default model carrying one learned bottleneck codec at each of ``boundaries``.

    The bottlenecks are untrained (seeded initialisation) but calibrated on seeded random inputs (quantizer ranges
    and probability tables). The plan splits at ``split`` (default: the last boundary) with the learned codec,
    and has one operating point per boundary using the learned codec there. Exits never fire (threshold 2), so
    every request offloads.
    """
    from partitioner.weights import load_default
    from splitinfer.bottleneck import Bottleneck, BottleneckConfig
    from splitinfer.bundle import OperatingPoint

    model, staged, heads, _ = load_default()
    torch.manual_seed(seed)
    x = torch.randn(64, 1, 28, 28)
    codecs, states = [], {}
    for b in boundaries:
        cfg = BottleneckConfig(boundary=b, in_shape=tuple(staged.boundaries[b].shape), channels=4, bits=2, hidden=16)
        bn = Bottleneck(cfg).eval()
        with torch.inference_mode():
            feats = staged.run(x, 0, b).clone()
        bn.calibrate(feats)
        codecs.append(CodecSpec(name="bottleneck", params=cfg.to_params()))
        states[b] = bn.state_for_bundle()
    split = boundaries[-1] if split is None else split
    plan = new_plan(
        "default", staged,
        InputSpec(shape=[1, 28, 28], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD], labels=FASHION_MNIST_CLASSES),
        split=split, codec=CodecSpec(name="bottleneck"), learned_codecs=codecs,
        exits=[ExitSpec(boundary=b, threshold=2.0) for b in sorted(heads)],
        operating_points=[OperatingPoint(bandwidth_bps=1e6 * (i + 1), rtt_ms=10.0, split=b, codec="bottleneck",
                                         exits=[e for e in sorted(heads) if e <= b], expected_latency_ms=1.0,
                                         expected_bytes=100.0) for i, b in enumerate(boundaries)],
    )
    return save_bundle(path, plan, model, heads, codec_states=states)
