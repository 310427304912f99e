"""Benchmark: every torchvision model by name against its published figures, and the embedded small vision
transformer's accuracy, certified exits and token codecs.

1. **Zoo** (``partitioner.published.check_published``): every name of
   ``torchvision.models.list_models(module=torchvision.models)`` loaded as ``plan profile --model NAME`` does
   (random weights, the published input size of its default weights), staged, its parameter count compared with
   torchvision's ``num_params`` and its MACs (every matrix product, attention included) with the published
   ``_ops`` (GMACs).
2. **Small ViT** (``vit_fmnist``, committed weights, Fashion-MNIST test set at 28x28): test accuracy;
   certified exits (epsilon 0.01, delta 0.05, calibrated on the 5,000 validation images as ``plan make`` does)
   and their mean MACs per test image against the model without exits; every committed learned token codec
   (``splitinfer/weights/vit_fmnist_bottleneck_B.*``) and uint8-affine at its boundary, each test image encoded
   alone: mean bytes, ratio float32 bytes / bytes, accuracy drop (points); uint8 with one range per token (what
   the codec does) beside one range per channel, to show why.

Summary: ``models_total``, ``models_staged``, ``params_exact`` (count), ``macs_within_2pct_frac``,
``macs_exceptions`` (name: relative difference), ``vit_accuracy``, ``vit_exit_mac_ratio``,
``vit_exit_disagreement``, ``vit_codec_ratio_at_1pt`` (the best float32/bytes ratio among the token codecs
within 1 point, None when none is).

Run: ``python -m bench.models --out FILE.json [--models a,b,...] [--test-limit N] [--quick]`` (~5 min; ``--quick``:
three zoo models and 500 test images, the smoke test).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

VIT = "vit_fmnist"
EPSILON, DELTA = 0.01, 0.05
DROP_BAR_POINTS = 1.0


def zoo(names: list[str]) -> dict:
    """Every model's published-figures check and the summary counts."""
    from partitioner.published import MACS_TOLERANCE, check_published

    rows = []
    for name in names:
        check = check_published(name)
        rows.append(check.to_dict())
        print(f"{name:22s} staged={check.staged} stages={check.stages:4d} params_exact={check.params_exact} "
              f"GMACs {check.gmacs:9.3f} vs {check.published_gmacs:9.3f} ({check.seconds:.1f} s) {check.error}",
              flush=True)
    staged = [r for r in rows if r["staged"]]
    return {"models": rows, "models_total": len(rows), "models_staged": len(staged),
            "params_exact": sum(r["params_exact"] for r in rows),
            "macs_within_2pct_frac": sum(r["macs_match"] for r in rows) / max(1, len(rows)),
            "macs_tolerance": MACS_TOLERANCE,
            "macs_exceptions": {r["name"]: r["macs_rel_diff"] for r in rows if not r["macs_match"]}}


def per_channel_uint8(h: torch.Tensor) -> torch.Tensor:
    """Round trip of token features ``[N, L, D]`` through uint8 with one range per channel (over the tokens) and
    sample: the alternative to the codec's one range per token."""
    lo, hi = h.amin(dim=1, keepdim=True), h.amax(dim=1, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    return torch.round((h - lo) / scale).clamp(0, 255) * scale + lo


@torch.inference_mode()
def uint8_variants(staged, boundary: int, x: torch.Tensor, y: np.ndarray) -> dict:
    """Accuracy with uint8 per token (the codec) and per channel at ``boundary`` (bytes: values + 8 per range)."""
    from splitinfer.codec import UInt8AffineCodec

    n = staged.num_stages
    length, dim = staged.boundaries[boundary].shape
    per_token, per_channel, full = [], [], []
    for i in range(0, len(x), 500):
        h = staged.run(x[i : i + 500], 0, boundary)
        full.append(staged.run(h.clone(), boundary, n).argmax(1))
        per_token.append(staged.run(UInt8AffineCodec().roundtrip_each(h), boundary, n).argmax(1))
        per_channel.append(staged.run(per_channel_uint8(h), boundary, n).argmax(1))
    ref = float((torch.cat(full).numpy() == y).mean())

    def row(preds, ranges):
        acc = float((torch.cat(preds).numpy() == y).mean())
        return {"bytes": length * dim + 8 * ranges, "accuracy": acc, "drop_points": round(100 * (ref - acc), 3)}

    return {"per_token": row(per_token, length), "per_channel": row(per_channel, dim), "reference_accuracy": ref}


def small_vit(test_limit: int | None, data_dir: str | None) -> dict:
    """Accuracy, certified exits and token codecs of the committed small ViT."""
    from partitioner.codec import load_bottlenecks
    from partitioner.train import model_input, split_train_validation
    from partitioner.weights import load_default, weights_dir
    from splitinfer.bottleneck import LearnedCodec, evaluate_codec
    from splitinfer.calibration import calibrate, collect_scores, evaluate
    from splitinfer.codec import UInt8AffineCodec
    from splitinfer.data import load_fashion_mnist

    model, staged, exits, info = load_default(name=VIT)
    train, test = load_fashion_mnist("train", data_dir), load_fashion_mnist("test", data_dir)
    _, va_idx = split_train_validation(len(train), int(info["config"]["seed"]))
    n_test = test_limit or len(test)
    x_te, y_te = model_input(test.images[:n_test], 28), test.labels[:n_test].astype(np.int64)
    x_va = model_input(train.images[va_idx], 28)
    out: dict = {"model": VIT, "weights": info.get("command"), "test_images": n_test,
                 "params": sum(p.numel() for p in model.parameters()),
                 "macs": staged.macs_between(0, staged.num_stages)}
    with torch.inference_mode():
        pred = torch.cat([model(x_te[i : i + 1000]).argmax(1) for i in range(0, n_test, 1000)]).numpy()
    out["accuracy"] = float((pred == y_te).mean())

    t0 = time.perf_counter()
    cal = calibrate(collect_scores(staged, exits, x_va), EPSILON, DELTA, mode="certified")
    test_scores = collect_scores(staged, exits, x_te)
    res = evaluate(test_scores, cal.thresholds)
    exit_answers = res.mean_macs / test_scores.full_macs  # exit heads run included
    out["exits"] = {"boundaries": sorted(exits), "epsilon": EPSILON, "delta": DELTA,
                    "thresholds": [None if not np.isfinite(t) else float(t) for t in cal.thresholds],
                    "calibration_images": len(x_va), "certified_upper_bound": cal.upper_bound,
                    "test_disagreement": res.disagreement, "test_exit_rates": [float(r) for r in res.exit_rates],
                    "mac_ratio": exit_answers, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{VIT}: accuracy {out['accuracy']:.4f}; certified exits: MAC ratio {exit_answers:.3f}, test "
          f"disagreement {res.disagreement:.4f}", flush=True)

    codecs = []
    for boundary, (bn, binfo) in sorted(load_bottlenecks(weights_dir(), VIT, staged).items()):
        fp32 = staged.boundaries[boundary].fp32_bytes
        learned = evaluate_codec(staged, LearnedCodec(bn), boundary, x_te, y_te).to_dict()
        uint8 = evaluate_codec(staged, UInt8AffineCodec(), boundary, x_te, y_te).to_dict()
        row = {"boundary": boundary, "shape": staged.boundaries[boundary].shape, "fp32_bytes": fp32,
               "config": bn.cfg.to_params(), "command": binfo.get("command"), "learned": learned,
               "learned_ratio_vs_fp32": fp32 / learned["bytes_mean"], "uint8": uint8,
               "uint8_ratio_vs_fp32": fp32 / uint8["bytes_mean"],
               "uint8_granularity": (uint8_variants(staged, boundary, x_te, y_te)
                                     if len(staged.boundaries[boundary].shape) == 2 else None)}
        codecs.append(row)
        print(f"  boundary {boundary}: learned {learned['bytes_mean']:.1f} B ({row['learned_ratio_vs_fp32']:.0f}x "
              f"fp32), drop {learned['drop_points']:.2f} pts; uint8 {uint8['bytes_mean']:.0f} B, drop "
              f"{uint8['drop_points']:.2f} pts", flush=True)
    out["codecs"] = codecs
    within = [c["learned_ratio_vs_fp32"] for c in codecs if c["learned"]["drop_points"] <= DROP_BAR_POINTS]
    out["codec_ratio_at_1pt"] = max(within) if within else None
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="all", help="comma-separated torchvision names, or 'all'")
    ap.add_argument("--test-limit", type=int, default=None, help="Fashion-MNIST test images (default: all)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 zoo models, 500 test images")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.test_limit = "resnet18,vit_b_32,swin_t", 500
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    from splitinfer.models import torchvision_names

    names = list(torchvision_names()) if args.models == "all" else [m for m in args.models.split(",") if m]
    z = zoo(names)
    vit = small_vit(args.test_limit, args.data_dir)
    summary = {k: z[k] for k in ("models_total", "models_staged", "params_exact", "macs_within_2pct_frac",
                                 "macs_exceptions")}
    summary.update({"vit_accuracy": vit["accuracy"], "vit_exit_mac_ratio": vit["exits"]["mac_ratio"],
                    "vit_exit_disagreement": vit["exits"]["test_disagreement"],
                    "vit_codec_ratio_at_1pt": vit["codec_ratio_at_1pt"]})
    report = {"summary": summary, "zoo": z, "vit": vit, "seconds": round(time.perf_counter() - t0, 1),
              "torch": torch.__version__, "argv": argv}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return report


if __name__ == "__main__":
    main()
