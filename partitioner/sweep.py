"""Rate-accuracy sweep of learned bottlenecks over boundary x channels x bits (``splitinfer plan codec-sweep``).

For each (boundary, channels) one bottleneck is distilled without rounding; each bit width then gets its own
calibrated ranges and tables, evaluated twice: post-training quantization only (``ptq``) and after
quantization-aware fine-tuning (``qat``). uint8-affine and float32 at the same boundary are listed as
references. Every figure is measured on test images, each sample encoded on its own.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from partitioner.codec import default_train_images, evaluate_codec, test_images
from partitioner.weights import load_default
from splitinfer.bottleneck import BottleneckConfig, DistillConfig, LearnedCodec, requantize, train_bottleneck
from splitinfer.codec import UInt8AffineCodec


def run_sweep(boundaries: list[int], channels: list[int], bits: list[int], epochs_float: int = 1,
              epochs_qat: int = 1, train_limit: int | None = 20000, test_limit: int | None = None, threads: int = 2,
              data_dir: str | None = None, progress: bool = False,
              echo: Callable[[str], None] = print) -> dict:
    """Run the sweep on the committed default model; returns a JSON-able dict with one entry per point."""
    if not boundaries or not channels or not bits:
        raise ValueError("boundaries, channels and bits must each list at least one value")
    torch.set_num_threads(threads)
    _, staged, _, _ = load_default()
    n = staged.num_stages
    for b in boundaries:
        if not 0 < b < n or len(staged.boundaries[b].shape) != 3:
            raise ValueError(f"boundary {b} is not an interior [C, H, W] boundary of the default model")
    x_tr = default_train_images(data_dir, train_limit)
    x_te, y_te = test_images(data_dir, test_limit)
    t0 = time.perf_counter()
    points: list[dict] = []
    references: list[dict] = []
    for b in boundaries:
        shape = tuple(staged.boundaries[b].shape)
        with torch.no_grad():
            feats = torch.cat([staged.run(x_tr[i : i + 512], 0, b).clone() for i in range(0, len(x_tr), 512)])
        ref = evaluate_codec(staged, UInt8AffineCodec(), b, x_te, y_te).to_dict()
        references.append({"boundary": b, "codec": "uint8-affine", "fp32_bytes": staged.boundaries[b].fp32_bytes,
                           **ref})
        for c in channels:
            base_cfg = BottleneckConfig(boundary=b, in_shape=shape, channels=c, bits=max(bits))
            base, _ = train_bottleneck(staged, base_cfg, x_tr, DistillConfig(epochs_float=epochs_float, epochs_qat=0),
                                       progress=progress)
            for q in bits:
                cfg = replace(base_cfg, bits=q)
                entry = {"boundary": b, "channels": c, "bits": q, "fp32_bytes": staged.boundaries[b].fp32_bytes}
                ptq = requantize(base, q, feats)
                entry["ptq"] = evaluate_codec(staged, LearnedCodec(ptq), b, x_te, y_te).to_dict()
                if epochs_qat > 0:
                    qat, _ = train_bottleneck(staged, cfg, x_tr, DistillConfig(epochs_float=0, epochs_qat=epochs_qat),
                                              progress=progress, init=base)
                    entry["qat"] = evaluate_codec(staged, LearnedCodec(qat), b, x_te, y_te).to_dict()
                best = min((entry[k] for k in ("ptq", "qat") if k in entry),
                           key=lambda e: (e["drop_points"] > 1.0, e["bytes_mean"]))
                entry["ratio_vs_fp32"] = round(entry["fp32_bytes"] / best["bytes_mean"], 1)
                points.append(entry)
                echo(f"boundary {b} channels {c} bits {q}: ptq {entry['ptq']['bytes_mean']:.0f} B "
                     f"drop {entry['ptq']['drop_points']:.2f} pt"
                     + (f"; qat {entry['qat']['bytes_mean']:.0f} B drop {entry['qat']['drop_points']:.2f} pt"
                        if "qat" in entry else ""))
    return {"model": "default", "train_images": len(x_tr), "test_images": len(x_te),
            "epochs_float": epochs_float, "epochs_qat": epochs_qat, "machine": platform.node(),
            "seconds": round(time.perf_counter() - t0, 1), "references": references, "points": points}
