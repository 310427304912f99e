"""Benchmark: every compression method on the default model, the full Fashion-MNIST test set, against fp32.

Variants (each fine-tuned by distillation from the fp32 model for ``--epochs`` epochs on the training split,
labels included; ``--train-limit`` trims the images):

* ``deep``: Deep Compression (70 % sparsity per layer, 4-bit shared weights, ANS coded indices and positions);
* ``lowrank``: Tucker-2 on every convolution with one MAC keep fraction ``--lowrank-keep`` (the rank rule);
* ``auto`` and ``uniform``: low rank at the same whole-model MAC budget (``--mac-budget``, 50 %): per-layer keep
  fractions chosen by the automated policy (exact search on measured sensitivity) vs one fraction for all layers;
  ``auto-85``: the policy at 85 % of the MACs ``uniform`` actually kept (its rank rule lands below the budget:
  48.0 % for 50 %), so "reaches uniform's accuracy with 15 % fewer MACs" compares with what uniform spent;
  ``uniform`` runs first when both are asked for (without it, 85 % of the budget);
  ``auto-tight`` / ``uniform-tight``: the same pair at ``--tight-budget`` (20 %);
* ``ternary`` (TTQ) and ``binary`` (first and last layer in full precision);
* ``mixed``: per-layer bit widths (2..8) chosen by the policy under a mean of ``--mixed-bits`` bits per weight,
  and ``uniform-bits`` (every layer at ``--mixed-bits`` rounded) as its reference.

Per variant: test accuracy and drop (points), stored bytes (the file a bundle ships) and the ratio to fp32
safetensors, the ratio for the compressed layers alone, MACs, and latency (batch 1, 1 thread, medians; each
variant timed alternately with fp32 in the same run, reported as ratios) of the whole model and of the
split-6 head (stem and first downsampling). resnet50 (random weights, 224x224, latency only): its head to the
end of layer2 with every convolution of layer1-2 factorized at ``--resnet-keep``.

**The policy on a second model** (``--policy-model``, default ``mobilenet_v2_fmnist``; ``none`` skips it): the
default model is so over-parameterised for Fashion-MNIST that distillation recovers from any allocation (uniform
low rank at 50 % of the MACs ends *above* fp32), which leaves a per-layer policy nothing to win. MobileNetV2
(64x64, already compact: depthwise convolutions, narrow bottlenecks) is not: there the pair ``uniform`` (one rank
rule for every layer at ``--mac-budget``) and ``auto`` (the automated policy at the MACs ``uniform`` actually
kept, so never more) is fine-tuned alike for ``--policy-epochs`` epochs (default 0.5; uniform ~3 minutes here,
auto ~7 with its sensitivities); those use ``--policy-val-images`` held-out images (default 250: each of
MobileNetV2's factorizable layers at each of 12 settings is one pass over them).

Sub-8-bit weights (ternary, binary, mixed) have no fast kernels in torch: their latency is fp32's and no
speedup is claimed; their gain is storage, and the modelled energy of moving the weights (an over-the-air
update: stored bytes at a Raspberry Pi 4's radio energy per bit), reported apart from inference energy.

Run: ``python -m bench.compress --out FILE.json`` (also writes FILE.png and prints the table).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

from partitioner.compress import alternate_latency, figures, training_data
from partitioner.plots import compression_plot
from splitinfer.compression import artifact
from splitinfer.compression.coding import SEP
from splitinfer.compression.layers import state_bytes
from splitinfer.compression.lowrank import factorize, total_macs
from splitinfer.compression.methods import Compressed, Data, Options, compress
from splitinfer.energy import DEFAULT_DEVICE, get_profile
from splitinfer.staged import stage_model

HEAD_SPLIT = 6


def coded_layer_bytes(data: bytes, coded: dict) -> tuple[int, int]:
    """(stored bytes of the coded layers, their fp32 bytes) in a coded-weights file."""
    tensors = safetensors_load(data)
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if SEP in k)
    fp32 = sum(4 * c.symbols.numel() for c in coded.values())
    return stored, fp32


def head(model: torch.nn.Module, example: torch.Tensor, split: int) -> torch.nn.Module:
    """The staged head of ``model`` up to ``split`` (what the edge runs)."""
    return torch.nn.Sequential(*stage_model(model, example).stages[:split]).eval()


def latency(base: torch.nn.Module, other: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict:
    """Median batch-1 latency (ms) of two modules timed alternately, and their ratio."""
    a, b = alternate_latency(base, other, x, rounds=rounds, runs=200)
    return {"fp32_ms": round(a, 4), "ms": round(b, 4), "speedup": round(a / b, 3)}


def resnet50_lowrank(keep: float, rounds: int) -> dict:
    """resnet50 (random weights) head to the end of layer2: fp32 vs every layer1-2 convolution factorized."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    ex = torch.zeros(1, 3, 224, 224)
    staged = stage_model(model, ex)
    split = max(b.index for b in staged.boundaries if b.node.startswith("layer2_"))
    fact = torchvision.models.resnet50(weights=None).eval()
    fact.load_state_dict(model.state_dict())
    names = [n for n, m in fact.named_modules()
             if isinstance(m, torch.nn.Conv2d) and n.startswith(("layer1", "layer2"))]
    recipe = factorize(fact, ex, keep, layers=names)
    fstaged = stage_model(fact, ex)
    if [b.shape for b in fstaged.boundaries] != [b.shape for b in staged.boundaries]:
        raise RuntimeError("factorization changed resnet50's boundaries")
    h0 = torch.nn.Sequential(*staged.stages[:split]).eval()
    h1 = torch.nn.Sequential(*fstaged.stages[:split]).eval()
    x = torch.randn(1, 3, 224, 224)
    a, b = alternate_latency(h0, h1, x, rounds=rounds, runs=10)
    return {"split": split, "keep": keep, "factorized_layers": len(recipe),
            "head_macs_fp32": staged.macs_between(0, split), "head_macs": fstaged.macs_between(0, split),
            "fp32_ms": round(a, 3), "ms": round(b, 3), "speedup": round(a / b, 3),
            "note": "random weights: latency only (a low-rank random layer has no accuracy to keep)"}


def evaluate(name: str, base: torch.nn.Module, result: Compressed, x_test, y_test, example, rounds: int) -> dict:
    """Figures of one variant (accuracy, bytes, MACs, latency ratios)."""
    data = artifact.weights_bytes(result.model, result.coded)
    row = {"name": name, **figures(base, result, x_test, y_test, len(data), rounds=1)}
    if result.coded:
        stored, fp32 = coded_layer_bytes(data, result.coded)
        row.update(coded_layers_stored_bytes=stored, coded_layers_fp32_bytes=fp32,
                   coded_layers_ratio=round(fp32 / stored, 2))
    bh, ch = head(base, example, HEAD_SPLIT), head(result.model, example, HEAD_SPLIT)
    sb, sc = stage_model(base, example), stage_model(result.model, example)
    row["head_split"] = HEAD_SPLIT
    row["head_macs_fp32"] = sb.macs_between(0, HEAD_SPLIT)
    row["head_macs"] = sc.macs_between(0, HEAD_SPLIT)
    row["head_mac_reduction"] = round(1 - row["head_macs"] / row["head_macs_fp32"], 4)
    x1 = x_test[:1]
    row["head_latency"] = latency(bh, ch, x1, rounds)
    row["model_latency"] = latency(base, result.model, x1, rounds)
    row["latency_ms"] = row["model_latency"]["ms"]
    device = get_profile(DEFAULT_DEVICE)
    row["energy_modelled"] = {
        "device": device.name,
        "inference_mj": round(1e3 * device.compute_joules(row["latency_ms"] / 1e3 * device.compute_slowdown), 4),
        "weights_over_radio_mj": round(1e3 * device.radio_joules(row["stored_bytes"], 0.0), 3),
        "note": "inference: this machine's batch-1 latency x the device's slowdown x its per-core power (sub-8-bit "
                "weights run fp32 kernels: no saving claimed); weights over radio: the stored bytes at the "
                "device's radio energy per bit (what an over-the-air update of the model costs)"}
    row["report"] = {k: v for k, v in result.report.items() if k not in ("sensitivity",)}
    return row


def mac_fraction(row: dict) -> float:
    """The exact share of the full model's MACs a variant kept (its report's counts, not the rounded
    ``mac_reduction``): what a later budget must not exceed."""
    rep = row["report"]
    return rep["macs_after"] / rep["macs_before"]


def fp32_row(net: torch.nn.Module, example, x_test, y_test, rounds: int) -> dict:
    """The uncompressed model's row (every ratio 1: the noise floor of the latency figures)."""
    macs = total_macs(net, example)
    torch.set_num_threads(1)
    fp32 = Compressed(model=net, method="fp32", report={"macs_before": macs, "macs_after": macs})
    return evaluate("fp32", net, fp32, x_test, y_test, example, rounds)


def run_variant(name: str, net: torch.nn.Module, example, method: str, data: Data, opts: Options, x_test, y_test,
                args, label: str = "") -> dict:
    """Compress ``net`` with ``method`` (``args.threads`` torch threads), then measure it (1 thread: batch-1
    latency as on the edge) and print one line; its row."""
    torch.set_num_threads(args.threads)
    result = compress(net, example, method, data, opts)
    torch.set_num_threads(1)
    row = evaluate(name, net, result, x_test, y_test, example, args.rounds)
    print(f"{label}{name}: acc {row['test_accuracy']:.4f} drop {row['drop_points']:+.2f}, stored "
          f"{row['stored_bytes']:,} B (x{row['storage_ratio']:.1f}), MACs -{100 * row['mac_reduction']:.1f} %, head "
          f"x{row['head_latency']['speedup']:.2f} ({result.report['seconds']:.0f} s)", flush=True)
    return row


def policy_pair(args) -> dict:
    """``uniform`` then ``auto`` low rank on ``args.policy_model`` (see the module docstring): ``auto``'s budget
    is the MAC fraction ``uniform`` actually kept (exact); both fine-tuned alike for ``args.policy_epochs``
    epochs."""
    from splitinfer.models import embedded_model

    torch.manual_seed(0)
    net, _staged, x, y, x_val, x_test, y_test = training_data(args.policy_model, train_limit=args.train_limit,
                                                              val_images=min(args.val_images,
                                                                             args.policy_val_images))
    if args.test_limit:
        x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
    example = embedded_model(args.policy_model).example()
    data = Data.of(net, x, y, x_val)
    rows = [fp32_row(net, example, x_test, y_test, args.rounds)]
    for name, method in (("uniform", "lowrank"), ("auto", "auto")):
        budget = args.mac_budget if name == "uniform" else mac_fraction(rows[1])
        rows.append(run_variant(name, net, example, method, data, Options(epochs=args.policy_epochs, budget=budget),
                                x_test, y_test, args, label=f"{args.policy_model} "))
    uniform, auto = rows[1], rows[2]
    summary = {"policy_model": args.policy_model, "policy_model_epochs": args.policy_epochs,
               "policy_model_fp32_accuracy": rows[0]["test_accuracy"],
               "policy_model_uniform_accuracy": uniform["test_accuracy"],
               "policy_model_auto_accuracy": auto["test_accuracy"],
               "policy_model_uniform_mac_fraction": round(1 - uniform["mac_reduction"], 4),
               "policy_model_auto_mac_fraction": round(1 - auto["mac_reduction"], 4),
               "policy_model_auto_vs_uniform_drop_gain": round(100 * (auto["test_accuracy"]
                                                                      - uniform["test_accuracy"]), 2)}
    return {"model": args.policy_model, "epochs": args.policy_epochs, "variants": rows, "summary": summary}


def table(rows: list[dict]) -> str:
    """The printed table."""
    lines = [f"{'variant':<14} {'acc':>7} {'drop':>6} {'stored B':>10} {'x fp32':>7} {'x layers':>8} "
             f"{'MACs -%':>7} {'head MACs -%':>12} {'head x':>7} {'model x':>7}"]
    for r in rows:
        lines.append(f"{r['name']:<14} {r['test_accuracy']:>7.4f} {r['drop_points']:>6.2f} {r['stored_bytes']:>10,} "
                     f"{r['storage_ratio']:>7.2f} {r.get('coded_layers_ratio', float('nan')):>8.2f} "
                     f"{100 * r['mac_reduction']:>7.1f} {100 * r['head_mac_reduction']:>12.1f} "
                     f"{r['head_latency']['speedup']:>7.3f} {r['model_latency']['speedup']:>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--val-images", type=int, default=2000, help="held-out images for the policies' sensitivities")
    ap.add_argument("--lowrank-keep", type=float, default=0.25)
    ap.add_argument("--mac-budget", type=float, default=0.5)
    ap.add_argument("--tight-budget", type=float, default=0.2, help="MAC budget of the auto/uniform-tight pair")
    ap.add_argument("--mixed-bits", type=float, default=3.0)
    ap.add_argument("--resnet-keep", type=float, default=0.4)
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per latency ratio")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training (timing uses 1)")
    ap.add_argument("--skip-resnet50", action="store_true")
    ap.add_argument("--methods", default="deep,lowrank,auto,auto-85,uniform,auto-tight,uniform-tight,ternary,binary,"
                                         "mixed,uniform-bits")
    ap.add_argument("--policy-model", default="mobilenet_v2_fmnist",
                    help="second embedded model for the automated policy vs uniform (none: skip)")
    ap.add_argument("--policy-epochs", type=float, default=0.5, help="distillation epochs of that pair")
    ap.add_argument("--policy-val-images", type=int, default=250,
                    help="held-out images for the policy's sensitivities on that model")
    args = ap.parse_args(argv)
    from splitinfer.models import EMBEDDED_MODELS

    if args.policy_model != "none" and args.policy_model not in EMBEDDED_MODELS:
        ap.error(f"--policy-model {args.policy_model!r}: choose none or one of {', '.join(EMBEDDED_MODELS)}")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    net, _staged, x, y, x_val, x_test, y_test = training_data("default", train_limit=args.train_limit,
                                                              val_images=args.val_images)
    if args.test_limit:
        x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
    example = torch.zeros(1, 1, 28, 28)
    torch.set_num_threads(args.threads)
    data = Data.of(net, x, y, x_val)
    opts = Options(epochs=args.epochs)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "auto-85" in wanted and "uniform" in wanted and wanted.index("uniform") > wanted.index("auto-85"):
        wanted.remove("uniform")  # auto-85's budget is a fraction of what uniform kept
        wanted.insert(wanted.index("auto-85"), "uniform")
    plan = {
        "deep": ("deep", opts),
        "lowrank": ("lowrank", Options(epochs=args.epochs, keep=args.lowrank_keep)),
        "auto": ("auto", Options(epochs=args.epochs, budget=args.mac_budget)),
        "auto-85": ("auto", Options(epochs=args.epochs, budget=0.85 * args.mac_budget)),
        "auto-tight": ("auto", Options(epochs=args.epochs, budget=args.tight_budget)),
        "uniform-tight": ("lowrank", Options(epochs=args.epochs, budget=args.tight_budget)),
        "uniform": ("lowrank", Options(epochs=args.epochs, budget=args.mac_budget)),
        "ternary": ("ternary", opts),
        "binary": ("binary", opts),
        "mixed": ("mixed", Options(epochs=args.epochs, budget=args.mixed_bits)),
        "uniform-bits": ("uniform-bits", Options(epochs=args.epochs, bits=max(2, round(args.mixed_bits)))),
    }
    # the second model's pair first: its figures are known early in this long run
    policy = None if args.policy_model == "none" else policy_pair(args)
    torch.manual_seed(0)  # the default model's variants start from the same seed with or without the pair
    rows: list[dict] = [fp32_row(net, example, x_test, y_test, args.rounds)]
    for name in wanted:
        method, o = plan[name]
        uniform_row = next((r for r in rows if r["name"] == "uniform"), None)
        if name == "auto-85" and uniform_row is not None:
            o = Options(epochs=args.epochs, budget=0.85 * mac_fraction(uniform_row))
        rows.append(run_variant(name, net, example, method, data, o, x_test, y_test, args))
    torch.set_num_threads(1)
    r50 = None if args.skip_resnet50 else resnet50_lowrank(args.resnet_keep, max(3, args.rounds // 2))
    by = {r["name"]: r for r in rows}

    def get(name: str, key: str):
        return by[name][key] if name in by else None

    summary = {
        "test_images": len(x_test),
        "fp32_accuracy": by["fp32"]["test_accuracy"],
        "deep_compression_ratio": get("deep", "storage_ratio"),
        "deep_compression_drop": get("deep", "drop_points"),
        "lowrank_mac_reduction": by["lowrank"]["head_mac_reduction"] if "lowrank" in by else None,
        "lowrank_model_mac_reduction": get("lowrank", "mac_reduction"),
        "lowrank_drop": get("lowrank", "drop_points"),
        "lowrank_head_speedup": by["lowrank"]["head_latency"]["speedup"] if "lowrank" in by else None,
        "ternary_storage_ratio": get("ternary", "coded_layers_ratio"),
        "ternary_drop": get("ternary", "drop_points"),
        "binary_drop": get("binary", "drop_points"),
        "binary_storage_ratio": get("binary", "coded_layers_ratio"),
        "mixed_precision_storage_ratio": get("mixed", "storage_ratio"),
        "mixed_precision_drop": get("mixed", "drop_points"),
        "uniform_bits_storage_ratio": get("uniform-bits", "storage_ratio"),
        "uniform_bits_drop": get("uniform-bits", "drop_points"),
        "auto_vs_uniform_drop_gain": (round(100 * (by["auto"]["test_accuracy"] - by["uniform"]["test_accuracy"]), 2)
                                      if "auto" in by and "uniform" in by else None),
        "auto_mac_fraction": round(1 - by["auto"]["mac_reduction"], 4) if "auto" in by else None,
        "auto_85_mac_fraction": round(1 - by["auto-85"]["mac_reduction"], 4) if "auto-85" in by else None,
        # the fraction of uniform's MACs that auto-85 saves (its bar: >= 0.15 at no lower accuracy)
        "auto_85_fewer_macs_than_uniform": (round(1 - (1 - by["auto-85"]["mac_reduction"])
                                                  / (1 - by["uniform"]["mac_reduction"]), 4)
                                            if "auto-85" in by and "uniform" in by else None),
        "auto_85_vs_uniform_drop_gain": (round(100 * (by["auto-85"]["test_accuracy"]
                                                      - by["uniform"]["test_accuracy"]), 2)
                                         if "auto-85" in by and "uniform" in by else None),
        "auto_vs_uniform_tight_drop_gain": (round(100 * (by["auto-tight"]["test_accuracy"]
                                                         - by["uniform-tight"]["test_accuracy"]), 2)
                                            if "auto-tight" in by and "uniform-tight" in by else None),
        "uniform_mac_fraction": round(1 - by["uniform"]["mac_reduction"], 4) if "uniform" in by else None,
        "resnet50_lowrank_head_speedup": r50["speedup"] if r50 else None,
        **(policy["summary"] if policy else {}),
    }
    out = {"machine": f"{platform.node()} {platform.machine()}", "torch": torch.__version__,
           "settings": vars(args) | {"out": str(args.out)}, "fp32_state_bytes": state_bytes(net),
           "variants": rows, "policy_model": policy, "resnet50": r50, "summary": summary,
           "seconds": round(time.perf_counter() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    compression_plot(rows, args.out.with_suffix(".png"))
    print(table(rows))
    if policy:
        print(f"automated policy vs uniform on {policy['model']} ({policy['epochs']} epochs of distillation):")
        print(table(policy["variants"]))
    if r50:
        print(f"resnet50 head to layer2: {r50['factorized_layers']} convolutions factorized at keep {r50['keep']}: "
              f"{r50['fp32_ms']} -> {r50['ms']} ms (x{r50['speedup']})")
    print(json.dumps(summary, indent=2))
    return out


if __name__ == "__main__":
    main()
