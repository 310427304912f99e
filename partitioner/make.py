"""``splitinfer plan make``: profile, estimate every split, choose one and write the bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from partitioner.cost import Link, estimate_all
from partitioner.profile import Profile, profile_model
from partitioner.train import split_train_validation
from partitioner.weights import load_default
from splitinfer.bundle import CodecSpec, ExitSpec, InputSpec, OperatingPoint, Plan, SplitEstimate, new_plan, save_bundle
from splitinfer.codec import get_codec
from splitinfer.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    to_model_input,
)
from splitinfer.energy import DeviceProfile
from splitinfer.exits import choose_thresholds, exit_outputs, simulate

GRID_BANDWIDTHS = (0.5e6, 2e6, 5e6, 10e6, 50e6, 200e6)
GRID_RTTS = (0.005, 0.020, 0.050, 0.150)


@dataclass
class PlanResult:
    plan: Plan
    profile: Profile
    estimates: list[SplitEstimate]
    chosen: SplitEstimate
    validation_agreement: float
    path: Path


def _candidates(n: int, splits: str) -> list[int]:
    if splits == "all":
        return list(range(n + 1))
    if splits == "interior":
        return list(range(1, n))
    raise ValueError("splits must be 'all' or 'interior'")


def best_split(estimates: list[SplitEstimate], candidates: list[int]) -> SplitEstimate:
    """The candidate with the lowest expected latency (ties: the earlier split)."""
    pool = [e for e in estimates if e.split in candidates]
    return min(pool, key=lambda e: (e.expected_latency_ms, e.split))


def make_default_plan(out: Path, link: Link, device: DeviceProfile | None = None, edge_slowdown: float = 1.0,
                      splits: str = "all", max_agreement_drop: float = 0.01, repeats: int = 30,
                      data_dir: str | None = None, weights: Path | None = None, codec: str = "uint8-affine",
                      validation_limit: int | None = None) -> PlanResult:
    """Plan the embedded default model for one link condition and write the bundle to ``out``."""
    model, staged, exits, info = load_default(weights)
    train = load_fashion_mnist("train", data_dir)
    _, va_idx = split_train_validation(len(train), int(info["config"]["seed"]))
    if validation_limit:
        va_idx = va_idx[:validation_limit]
    x_val = to_model_input(train.images[va_idx], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    with torch.inference_mode():
        conf, pred, full = exit_outputs(staged, exits, x_val)
    decision = choose_thresholds(conf, pred, full, max_agreement_drop)

    prof = profile_model(staged, exits, get_codec(codec), x_val[:1], repeats=repeats, threads=1)
    estimates = estimate_all(prof, prof, decision.exit_rates, link, edge_slowdown, device)
    chosen = best_split(estimates, _candidates(staged.num_stages, splits))
    active = set(chosen.exits)
    agreement = simulate({b: t for b, t in decision.thresholds.items() if b in active}, conf, pred, full).agreement

    points = []
    for bw in GRID_BANDWIDTHS:
        for rtt in GRID_RTTS:
            est = estimate_all(prof, prof, decision.exit_rates, Link(bw, rtt), edge_slowdown, device)
            best = best_split(est, _candidates(staged.num_stages, splits))
            pt_agree = simulate({b: t for b, t in decision.thresholds.items() if b in best.exits},
                                conf, pred, full).agreement
            points.append(OperatingPoint(bandwidth_bps=bw, rtt_ms=rtt * 1e3, split=best.split, codec=codec,
                                         exits=best.exits, expected_latency_ms=best.expected_latency_ms,
                                         expected_bytes=best.bytes_per_offload * best.offload_rate,
                                         expected_agreement=round(pt_agree, 5)))

    exit_specs = [ExitSpec(boundary=b, threshold=decision.thresholds[b], hidden=exits[b].hidden, macs=exits[b].macs(),
                           val_exit_rate=round(decision.exit_rates[b], 5)) for b in sorted(exits)]
    plan = new_plan(
        "default", staged,
        InputSpec(shape=[1, 28, 28], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD], labels=FASHION_MNIST_CLASSES),
        split=chosen.split, codec=CodecSpec(name=codec), exits=exit_specs,
        estimates=estimates, operating_points=points,
        notes={
            "bandwidth_bps": link.bandwidth_bps, "rtt_ms": link.rtt_s * 1e3, "edge_slowdown": edge_slowdown,
            "device": device.name if device else "this machine", "splits_considered": splits,
            "max_agreement_drop": max_agreement_drop, "validation_images": len(va_idx),
            "validation_agreement": round(agreement, 5), "profiled_on": prof.machine,
            "weights_test_accuracy": float(info.get("test_accuracy", 0.0)),
        },
    )
    for spec, ms in zip(plan.stages, prof.stage_ms, strict=True):
        spec.edge_ms = round(ms * edge_slowdown, 5)
        spec.server_ms = round(ms, 5)
    path = save_bundle(out, plan, model, {b: exits[b] for b in sorted(exits)})
    return PlanResult(plan=plan, profile=prof, estimates=estimates, chosen=chosen, validation_agreement=agreement,
                      path=path)
