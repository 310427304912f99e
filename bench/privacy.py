"""Benchmark: what the payload reveals (inversion attacks per boundary and codec) and what the adversarial
defence buys, on the default model and Fashion-MNIST.

1. A separate probe classifier (:class:`partitioner.privacy.ProbeClassifier`) is trained on the attacker's
   training images; it scores how recognisable each reconstruction is.
2. **Floor**: a decoder fed only the model's predicted class (what any task-preserving codec tells a server).
3. **White-box** inversion (:func:`partitioner.privacy.measure_leakage`) of the uint8-affine payload at each of
   ``--boundaries``, of the committed learned bottleneck (boundary 6, 8 channels x 7 x 7, 2 bits) and of the
   image file at split 0; **black-box** inversion of the bottleneck's symbols from ``--public-images`` payloads.
4. **Defence**: the committed bottleneck fine-tuned with the adversarial privacy term
   (``DistillConfig(privacy="adversarial")``, same configuration and bit budget, ``--defence-epochs`` QAT epochs
   on ``--defence-images``), then attacked afresh by both attackers; accuracy of both codecs on the whole test
   set (every sample encoded alone), ``defence_drop`` = undefended minus defended accuracy, in points.

Writes ``--out`` (JSON with a ``summary``), the reconstruction grid ``--png`` (default: beside ``--out``) and,
with ``--leakage-out``, the leakage table ``plan make --max-leakage`` reads.

Run: ``python -m bench.privacy --out FILE.json`` (~30 minutes on 2 cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def defend(staged, bn, x_train, weight: float, epochs: int, seed: int = 0):
    """The committed bottleneck ``bn`` fine-tuned with the adversarial privacy term (same configuration)."""
    from splitinfer.bottleneck import DistillConfig, train_bottleneck

    dcfg = DistillConfig(epochs_float=0, epochs_qat=epochs, seed=seed, privacy="adversarial",
                         privacy_weight=weight, threads=2)
    return train_bottleneck(staged, bn.cfg, x_train, dcfg, progress=False, init=bn)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--leakage-out", type=Path, default=None, help="also write the leakage table here")
    ap.add_argument("--boundaries", default="1,4,6,9,11,13,14")
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--public-images", type=int, default=5000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3, help="attack decoder epochs")
    ap.add_argument("--defence-weight", type=float, default=0.5)
    ap.add_argument("--defence-epochs", type=int, default=3)
    ap.add_argument("--defence-images", type=int, default=20000)
    ap.add_argument("--accuracy-images", type=int, default=10000, help="test images scoring codec accuracy")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.train_images, args.public_images, args.test_images = 600, 300, 200
        args.epochs, args.defence_images, args.defence_epochs, args.accuracy_images = 1, 400, 1, 500
        args.boundaries = "6,14"
    torch.set_num_threads(2)
    t_start = time.perf_counter()

    from partitioner.codec import load_default_bottleneck, test_images
    from partitioner.privacy import (
        AttackConfig,
        PayloadView,
        blackbox_attack,
        class_only_attack,
        embedded_victim,
        measure_leakage,
        reconstruction_grid,
        train_probe,
        whitebox_attack,
    )
    from splitinfer.bottleneck import LearnedCodec, evaluate_codec
    from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from splitinfer.plan import InputSpec

    cfg = AttackConfig(train_images=args.train_images, public_images=args.public_images,
                       test_images=args.test_images, epochs=args.epochs)
    v, info, pixels = embedded_victim("default", cfg, args.data_dir)
    spec = InputSpec(shape=[1, 28, 28], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
                     labels=FASHION_MNIST_CLASSES)
    _log(f"data: {len(v.x_train)} attacker training images, {len(v.x_public)} public, {len(v.x_test)} test")
    probe = train_probe(v.img_train, _train_labels(v, info, args), epochs=2)
    probe_orig = float((probe(v.img_test).argmax(1).numpy() == v.y_test).mean())
    _log(f"probe classifier: {probe_orig:.4f} on the original test images")

    floor, floor_rec = class_only_attack(v, cfg, probe)
    _log(f"class-only floor: SSIM {floor.ssim:.3f}")
    bn, bn_info = load_default_bottleneck()
    table, recs = measure_leakage("default", v, _ints(args.boundaries), cfg, spec, pixels, [bn], probe, _log)
    wb = next(e for e in table.entries if e.codec == "bottleneck")
    bb, bb_rec = blackbox_attack(v, PayloadView(LearnedCodec(bn), "bottleneck"), bn.cfg.boundary, cfg, probe)
    _log(f"bottleneck black-box SSIM {bb.ssim:.3f}")

    _log(f"defence: adversarial fine-tuning, weight {args.defence_weight}, {args.defence_epochs} epochs on "
         f"{args.defence_images} images")
    x_def = v.x_train[: args.defence_images]
    t0 = time.perf_counter()
    dbn, dreport = defend(v.staged, bn, x_def, args.defence_weight, args.defence_epochs)
    defence_s = time.perf_counter() - t0
    dview = PayloadView(LearnedCodec(dbn), "bottleneck")
    dwb, dwb_rec = whitebox_attack(v, dview, bn.cfg.boundary, cfg, probe)
    dbb, _ = blackbox_attack(v, dview, bn.cfg.boundary, cfg, probe)
    _log(f"defended: white-box SSIM {dwb.ssim:.3f}, black-box {dbb.ssim:.3f}")
    x_acc, y_acc = test_images(args.data_dir, args.accuracy_images)
    und = evaluate_codec(v.staged, LearnedCodec(bn), bn.cfg.boundary, x_acc, y_acc, bytes_limit=500)
    dfd = evaluate_codec(v.staged, LearnedCodec(dbn), bn.cfg.boundary, x_acc, y_acc, bytes_limit=500)
    _log(f"accuracy: undefended {und.accuracy:.4f} ({und.bytes_mean:.1f} B), defended {dfd.accuracy:.4f} "
         f"({dfd.bytes_mean:.1f} B)")

    uint8 = {str(e.boundary): e.ssim for e in table.entries if e.codec == "uint8-affine" and e.boundary > 0}
    summary = {
        "ssim_whitebox_uint8": uint8,
        "ssim_whitebox_bottleneck": wb.ssim,
        "ssim_blackbox_bottleneck": round(bb.ssim, 4),
        "ssim_class_only_floor": round(floor.ssim, 4),
        "ssim_image_file": next(e.ssim for e in table.entries if e.codec == "image"),
        "defence_ssim_whitebox": round(dwb.ssim, 4),
        "defence_ssim_blackbox": round(dbb.ssim, 4),
        "defence_ssim_reduction": round((wb.ssim - dwb.ssim) / wb.ssim, 4),
        "defence_reduction_above_floor": round((wb.ssim - dwb.ssim) / max(1e-9, wb.ssim - floor.ssim), 4),
        "defence_drop": round(100 * (und.accuracy - dfd.accuracy), 3),
        "defence_bar_reachable": bool(floor.ssim <= 0.5 * wb.ssim),
    }
    report = {
        "bench": "privacy", "model": "default", "torch": torch.__version__,
        "config": {**vars(args), "out": str(args.out), "png": str(args.png) if args.png else None,
                   "leakage_out": str(args.leakage_out) if args.leakage_out else None},
        "probe_accuracy_on_originals": round(probe_orig, 4),
        "class_only": floor.to_dict(),
        "leakage_table": table.to_dict(),
        "bottleneck": {"whitebox": {"ssim": wb.ssim, "psnr": wb.psnr, "probe_accuracy": wb.probe_accuracy},
                       "blackbox": bb.to_dict(), "accuracy": und.to_dict(), "config": bn.cfg.to_params()},
        "defence": {"kind": "adversarial", "weight": args.defence_weight, "epochs": args.defence_epochs,
                    "images": len(x_def), "train_seconds": round(defence_s, 1), "history": dreport["history"],
                    "whitebox": dwb.to_dict(), "blackbox": dbb.to_dict(), "accuracy": dfd.to_dict()},
        "summary": summary,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    png = args.png or args.out.with_suffix(".png")
    columns = {"image file" if k == "image" else k: r for k, r in recs.items()}
    columns["bn black-box"] = bb_rec
    columns["defended bn"] = dwb_rec
    columns["class only"] = floor_rec
    reconstruction_grid(png, v.img_test, columns, title="white-box inversions of the default model's payloads "
                        "(Fashion-MNIST test images)")
    if args.leakage_out:
        table.attack["bench"] = "python -m bench.privacy " + " ".join(argv if argv is not None else sys.argv[1:])
        table.save(args.leakage_out)
    _log(f"summary: {json.dumps(summary)}; {report['seconds']:.0f} s")
    return report


def _train_labels(v, info, args) -> np.ndarray:
    """Labels of the attacker's training images (the same split as embedded_victim's)."""
    from partitioner.train import split_train_validation
    from splitinfer.data import load_fashion_mnist

    train = load_fashion_mnist("train", args.data_dir)
    tr_idx, _ = split_train_validation(len(train), int(info["config"]["seed"]))
    return np.asarray(train.labels[tr_idx[: len(v.x_train)]])


if __name__ == "__main__":
    main()
