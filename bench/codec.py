"""Benchmark: feature codecs and head compression on the default model (and resnet50's head for int8 speed).

Features, on the full Fashion-MNIST test set, at the committed bottleneck's boundary, every test image
treated as offloaded and encoded on its own (batch 1):

* float32, float16, uint8-affine, uint8-affine + zstd (generic codecs on the raw boundary tensor);
* ours: the committed learned bottleneck (ANS), the same with zstd and with raw bit-packing, and re-quantized
  post-training at other bit widths (more rate points);
* cloud-only: the input image as PNG (lossless) and JPEG quality 90 (accuracy of the decoded JPEG).

Per codec: mean bytes per sample, top-1 accuracy, agreement with the uncompressed model, encode and decode
time (median per sample, 1 torch thread). "Drop" is in accuracy points versus the uncompressed model.

Heads (default model: split ``--head-split``, 8 by default: stem, downsampling and the 14x14 residual block;
the head before the codec's boundary 6 has no stage-internal channels to prune. resnet50 at 224x224 cut after
``layer2``, random weights): fp32, int8 (FX post-training quantization, x86), and for the default model a pruned head
(stage-internal channels removed, then distillation fine-tuning): accuracy, MACs, size, latency (batch 1,
1 thread, medians; fp32 and int8 alternate in the same run).

Run: ``python -m bench.codec --out FILE.json [--test-limit N] [--prune-ratio 0.67] [--prune-epochs 2]``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from partitioner.codec import default_train_images, evaluate_codec, load_default_bottleneck, test_images
from partitioner.weights import load_default
from splitinfer.bottleneck import BottleneckConfig, LearnedCodec, requantize
from splitinfer.codec import Float32Codec, Meta, UInt8AffineCodec
from splitinfer.compression.int8 import int8_head, quantize_int8
from splitinfer.compression.prune import distill_head, prune_head
from splitinfer.data import load_fashion_mnist
from splitinfer.errors import InvalidInput
from splitinfer.staged import stage_model
from splitinfer.timing import alternate, time_calls, time_codec


class Float16Codec:
    """float16 values (bench baseline)."""

    name = "float16"

    def encode(self, t: torch.Tensor) -> tuple[bytes, Meta]:
        return t.detach().to(torch.float16).numpy().tobytes(), {"shape": ",".join(map(str, t.shape))}

    def decode(self, payload: bytes, meta: Meta) -> torch.Tensor:
        shape = [int(v) for v in str(meta["shape"]).split(",")]
        return torch.from_numpy(np.frombuffer(payload, dtype=np.float16).reshape(shape).astype(np.float32))


class ZstdWrapped:
    """Any codec's payload compressed with zstd (bench baseline: uint8 + zstd)."""

    def __init__(self, inner, level: int = 19):
        import zstandard

        self.inner = inner
        self.name = f"{inner.name}+zstd"
        self._c = zstandard.ZstdCompressor(level=level)
        self._d = zstandard.ZstdDecompressor()

    def encode(self, t: torch.Tensor) -> tuple[bytes, Meta]:
        payload, meta = self.inner.encode(t)
        return self._c.compress(payload), {**meta, "n": len(payload)}

    def decode(self, payload: bytes, meta: Meta) -> torch.Tensor:
        raw = self._d.decompress(payload, max_output_size=int(meta["n"]))
        if len(raw) != int(meta["n"]):
            raise InvalidInput("zstd payload length mismatch")
        return self.inner.decode(raw, meta)


def codec_timing(codec, feats: torch.Tensor, reps: int = 400) -> dict:
    """Median encode, decode and encode+decode time per sample (batch 1), over ``feats`` samples in turn."""
    t = time_codec(codec, feats, runs=reps, warmup=20, rows=True)
    return {"encode_ms_p50": round(t.encode.p50, 4), "decode_ms_p50": round(t.decode.p50, 4),
            "encode_decode_ms_p50": round(t.roundtrip.p50, 4)}


def image_baselines(staged, test_limit: int | None) -> dict:
    """Cloud-only: bytes of each test image as PNG and JPEG q90; accuracy of the model on decoded JPEGs."""
    from PIL import Image

    from splitinfer.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, to_model_input

    test = load_fashion_mnist("test")
    n = test_limit or len(test)
    png, jpg, jpg_imgs = [], [], []

    def save_png(i: int) -> None:
        b = io.BytesIO()
        Image.fromarray(test.images[i]).save(b, format="PNG", optimize=True)
        png.append(b.tell())

    enc_png = time_calls(save_png, runs=n)
    for img in test.images[:n]:
        im = Image.fromarray(img)
        b = io.BytesIO()
        im.save(b, format="JPEG", quality=90)
        jpg.append(b.tell())
        jpg_imgs.append(np.asarray(Image.open(io.BytesIO(b.getvalue())).convert("L")))
    y = test.labels[:n].astype(np.int64)
    with torch.inference_mode():
        x_ref = to_model_input(test.images[:n], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        x_jpg = to_model_input(np.stack(jpg_imgs), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        ref = torch.cat([staged(x_ref[i : i + 1000]) for i in range(0, n, 1000)]).argmax(1).numpy()
        pj = torch.cat([staged(x_jpg[i : i + 1000]) for i in range(0, n, 1000)]).argmax(1).numpy()
    return {
        "png": {"bytes_mean": round(float(np.mean(png)), 2), "accuracy": round(float((ref == y).mean()), 5),
                "agreement": 1.0, "encode_ms_p50": round(enc_png.p50, 4)},
        "jpeg_q90": {"bytes_mean": round(float(np.mean(jpg)), 2), "accuracy": round(float((pj == y).mean()), 5),
                     "agreement": round(float((pj == ref).mean()), 5)},
        "raw_uint8_bytes": int(test.images[0].size),
    }


def _size_bytes(module: torch.nn.Module) -> int:
    """Serialized size of a module's state (written to memory only, to measure; never loaded back)."""
    b = io.BytesIO()
    torch.save(module.state_dict(), b)
    return b.tell()


def head_latency_pair(fp32, int8, x: torch.Tensor, rounds: int = 5, reps: int = 20) -> tuple[float, float]:
    """Median batch-1 forward time (ms) of two heads, alternating rounds so both see the same machine state."""
    with torch.inference_mode():
        return alternate(lambda: fp32(x), lambda: int8(x), rounds, reps)


def resnet50_int8(rounds: int) -> dict:
    """fp32 vs int8 forward of resnet50's head (input to the end of layer2) at 224x224, batch 1."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    staged = stage_model(model, torch.zeros(1, 3, 224, 224))
    split = max(b.index for b in staged.boundaries if b.node.startswith("layer2_"))  # the end of layer2
    head = torch.nn.Sequential(*staged.stages[:split]).eval()
    calib = [torch.randn(4, 3, 224, 224) for _ in range(4)]
    q = quantize_int8(head, calib)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        ref, out = head(x), q(x)
    rel = float((ref - out).norm() / ref.norm())
    fp_ms, q_ms = head_latency_pair(head, q, x, rounds=rounds, reps=10)
    return {"split": split, "boundary_shape": staged.boundaries[split].shape,
            "head_macs": staged.macs_between(0, split), "fp32_ms_p50": round(fp_ms, 3), "int8_ms_p50": round(q_ms, 3),
            "speedup": round(fp_ms / q_ms, 3), "fp32_bytes": _size_bytes(head), "int8_bytes": _size_bytes(q),
            "relative_output_error": round(rel, 4)}


def default_heads(staged, model, split: int, x_te, y_te, prune_ratio: float, prune_epochs: int,
                  prune_train: int | None) -> dict:
    """fp32, int8 and pruned heads of the default model at ``split`` (tail fp32, unchanged)."""
    n = staged.num_stages
    calib = default_train_images(limit=512)
    q = int8_head(staged, split, calib, cuts=[3, 6])  # the default exits before the split stay float
    head = torch.nn.Sequential(*staged.stages[:split]).eval()

    def accuracy(head_fn) -> tuple[float, float]:
        with torch.inference_mode():
            preds = torch.cat([staged.run(head_fn(x_te[i : i + 1000].clone()), split, n)
                               for i in range(0, len(x_te), 1000)]).argmax(1).numpy()
            ref = torch.cat([staged(x_te[i : i + 1000]) for i in range(0, len(x_te), 1000)]).argmax(1).numpy()
        return float((preds == y_te).mean()), float((preds == ref).mean())

    ref_acc, _ = accuracy(head)
    q_acc, q_agree = accuracy(q)
    x1 = x_te[:1]
    fp_ms, q_ms = head_latency_pair(head, q, x1)
    pruned_model, prep = prune_head(model, torch.zeros(1, 1, 28, 28), split, prune_ratio)
    pstaged = stage_model(pruned_model, torch.zeros(1, 1, 28, 28))
    x_tr = default_train_images(limit=prune_train)
    before_acc, _ = accuracy(torch.nn.Sequential(*pstaged.stages[:split]).eval())
    drep = distill_head(pstaged, staged, split, x_tr, epochs=prune_epochs)
    phead = torch.nn.Sequential(*pstaged.stages[:split]).eval()
    p_acc, p_agree = accuracy(phead)
    fp_ms2, p_ms = head_latency_pair(head, phead, x1)
    return {
        "split": split,
        "fp32": {"accuracy": round(ref_acc, 5), "head_macs": staged.macs_between(0, split),
                 "bytes": _size_bytes(head), "ms_p50": round(fp_ms, 4)},
        "int8": {"accuracy": round(q_acc, 5), "agreement": round(q_agree, 5),
                 "drop_points": round(100 * (ref_acc - q_acc), 3), "bytes": _size_bytes(q), "ms_p50": round(q_ms, 4),
                 "speedup": round(fp_ms / q_ms, 3), "segments": q.cuts},
        "pruned": {"accuracy": round(p_acc, 5), "agreement": round(p_agree, 5),
                   "accuracy_before_finetune": round(before_acc, 5),
                   "drop_points": round(100 * (ref_acc - p_acc), 3), "head_macs": prep["head_macs_after"],
                   "mac_reduction": prep["mac_reduction"], "bytes": _size_bytes(phead), "ms_p50": round(p_ms, 4),
                   "fp32_ms_p50_same_round": round(fp_ms2, 4), "speedup": round(fp_ms2 / p_ms, 3),
                   "pruned_layers": prep["pruned"], "finetune": drep},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    ap.add_argument("--bits", default="2,4,6", help="extra bit widths for the re-quantized rate points")
    ap.add_argument("--head-split", type=int, default=8, help="split of the default model's compressed heads")
    ap.add_argument("--prune-ratio", type=float, default=0.67)
    ap.add_argument("--prune-epochs", type=int, default=2)
    ap.add_argument("--prune-train", type=int, default=None, help="training images for the pruned head's distillation")
    ap.add_argument("--skip-resnet50", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model, staged, _, _ = load_default()
    bn, bn_info = load_default_bottleneck()
    k = bn.cfg.boundary
    x_te, y_te = test_images(limit=args.test_limit)
    with torch.inference_mode():
        feats = torch.cat([staged.run(x_te[i : i + 1000], 0, k) for i in range(0, len(x_te), 1000)])
    fp32_bytes = staged.boundaries[k].fp32_bytes
    x_cal = default_train_images(limit=10000)
    with torch.inference_mode():
        cal_feats = torch.cat([staged.run(x_cal[i : i + 1000], 0, k) for i in range(0, len(x_cal), 1000)])

    codecs: dict[str, object] = {
        "float32": Float32Codec(), "float16": Float16Codec(), "uint8": UInt8AffineCodec(),
        "uint8+zstd": ZstdWrapped(UInt8AffineCodec()),
        f"ours_c{bn.cfg.channels}_b{bn.cfg.bits}_ans": LearnedCodec(bn),
    }
    for coder in ("zstd", "raw"):
        cfg = BottleneckConfig(**{**bn.cfg.__dict__, "coder": coder})
        other = type(bn)(cfg, nonneg=bool(bn.nonneg_flag.item() > 0.5))
        other.load_state_dict(bn.state_dict())
        codecs[f"ours_c{bn.cfg.channels}_b{bn.cfg.bits}_{coder}"] = LearnedCodec(other.eval())
    for bits in [int(b) for b in args.bits.split(",") if b.strip()]:
        if bits != bn.cfg.bits:
            codecs[f"ours_c{bn.cfg.channels}_b{bits}_ans_ptq"] = LearnedCodec(requantize(bn, bits, cal_feats))
    rows = {}
    for name, codec in codecs.items():
        ev = evaluate_codec(staged, codec, k, x_te, y_te).to_dict()
        ev.update(codec_timing(codec, feats))
        ev["ratio_vs_fp32"] = round(fp32_bytes / ev["bytes_mean"], 2)
        rows[name] = ev
        print(f"{name:>24}: {ev['bytes_mean']:9.1f} B  x{ev['ratio_vs_fp32']:>7.1f}  acc {ev['accuracy']:.4f} "
              f"(drop {ev['drop_points']:+.2f})  agree {ev['agreement']:.4f}  "
              f"enc+dec {ev['encode_decode_ms_p50']:.3f} ms", flush=True)
    images = image_baselines(staged, args.test_limit)
    print(f"{'png':>24}: {images['png']['bytes_mean']:9.1f} B   jpeg q90: {images['jpeg_q90']['bytes_mean']:.1f} B "
          f"acc {images['jpeg_q90']['accuracy']:.4f}", flush=True)
    heads = default_heads(staged, model, args.head_split, x_te, y_te, args.prune_ratio, args.prune_epochs,
                          args.prune_train)
    print(f"default head: int8 drop {heads['int8']['drop_points']:+.2f} pt, x{heads['int8']['speedup']:.2f}; "
          f"pruned {heads['pruned']['mac_reduction']:.1%} fewer MACs, drop {heads['pruned']['drop_points']:+.2f} pt",
          flush=True)
    r50 = None if args.skip_resnet50 else resnet50_int8(rounds=5)
    if r50:
        print(f"resnet50 head (split {r50['split']}): fp32 {r50['fp32_ms_p50']:.2f} ms, "
              f"int8 {r50['int8_ms_p50']:.2f} ms, x{r50['speedup']:.2f}", flush=True)

    ours = {n_: r for n_, r in rows.items() if n_.startswith("ours_")}
    within = {n_: r for n_, r in ours.items() if r["drop_points"] <= 1.0}
    best = min(within.items(), key=lambda kv: kv[1]["bytes_mean"]) if within else None
    shipped = rows[f"ours_c{bn.cfg.channels}_b{bn.cfg.bits}_ans"]
    summary = {
        "fp32_feature_bytes": fp32_bytes,
        "codec_at_1pt": best[0] if best else None,
        "codec_bytes_at_1pt": best[1]["bytes_mean"] if best else None,
        "codec_drop_at_1pt": best[1]["drop_points"] if best else None,
        "ratio_vs_fp32_at_1pt": round(fp32_bytes / best[1]["bytes_mean"], 2) if best else None,
        "png_bytes_mean": images["png"]["bytes_mean"],
        "smaller_than_png": bool(best and best[1]["bytes_mean"] < images["png"]["bytes_mean"]),
        "encode_decode_ms_p50": shipped["encode_decode_ms_p50"],
        "int8_speedup_resnet50_head": r50["speedup"] if r50 else None,
        "int8_drop_default": heads["int8"]["drop_points"],
        "pruned_mac_reduction": heads["pruned"]["mac_reduction"],
        "pruned_drop_default": heads["pruned"]["drop_points"],
    }
    result = {
        "machine": f"{platform.node()} {platform.machine()}", "torch": torch.__version__, "threads": 1,
        "test_images": len(x_te), "boundary": k, "boundary_shape": staged.boundaries[k].shape,
        "bottleneck": {"config": bn.cfg.to_params(), "macs_encoder_decoder": bn.macs(),
                       "trained": {key: bn_info.get(key) for key in ("command", "train_images", "train_seconds",
                                                                      "test")}},
        "features": rows, "images": images, "heads_default": heads, "resnet50_head": r50,
        "summary": summary, "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
