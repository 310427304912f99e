"""Benchmark: does a middle split pay on a real-size model? Learned codecs at several boundaries of the second
embedded model, and the adaptive agent against edge-only, cloud-only and the best fixed split on slow uplinks.

Model: ``mobilenet_v2_fmnist`` (torchvision MobileNetV2, grey stem, trained here on Fashion-MNIST rendered at
64x64; its committed weights, exit heads and learned bottlenecks: ``splitinfer/weights/mobilenet_v2_fmnist*``).

1. **Codecs** (the Fashion-MNIST test set, rendered at 64x64): for every committed learned bottleneck, each
   sample's boundary features encoded alone (as the edge does), decoded and finished by the tail
   (``partitioner.codec.evaluate_codec``): mean bytes per sample, the ratio float32 bytes / those bytes, test
   accuracy and its drop against the full model's test accuracy (points), and the input file each sample would
   be sent as instead (PNG or JPEG quality 90 of the 64x64 image, whichever is smaller, each sample alone).
2. **Cells** (``bench.e2e.run_model``, unchanged: the real cloud server, the link emulator, the real
   ``EdgeRuntime`` in ``bench.edge_worker`` limited by a cgroup to ``--edge-cpu`` of one CPU, default 0.25 — a
   Raspberry Pi 4-class device, the server ~4-5x faster; measured in the run): bandwidths 0.25, 0.5, 1, 2 and 5
   Mbit/s x RTT 5, 20 and 50 ms. The bundle is planned as a user does for that device (``plan make`` with the
   edge profile and agent overhead measured in the throttled edge process): certified exits (epsilon 1 %,
   delta 5 %), every committed learned codec a candidate. Configurations per cell: ``splitinfer`` (adaptive),
   ``edge_only`` (every certified exit), ``cloud_only`` (each test image's PNG or JPEG q90 file, whichever is
   smaller, to the server's image codec) and ``best_fixed`` (one configuration for the whole grid, lowest mean
   predicted latency); the agent is given each request's file (``--forward-files``), as its HTTP API is.
3. **Sensitivity** (predicted by the same planner, not measured): how the interior split's gain over the
   better endpoint moves with the edge's speed (CPU share) and with the input size (stage times and feature
   payloads scaled with the image area; the input files measured at each size), each alone and both together
   (``by_share_and_size``), and two bounds at the measured share and size: every learned codec's payload free
   (``free_codec``: 0 bytes, no coding time; the most any codec at these boundaries could gain) and no early
   exits anywhere (``no_exits``: what the certified exits take from the interior split).

Summary: ``model``, ``boundaries_with_codec``, ``codec_min_ratio_vs_fp32``, ``codec_max_drop``,
``codec_bytes_below_input_file`` (every codec's mean bytes below the mean input file), ``cells``,
``interior_cells`` (cells where the agent ran an interior split with a learned codec for most requests),
``interior_min_gain_vs_better_endpoint`` (min over those cells of min(edge_only, cloud_only) / splitinfer mean
latency), ``max_ratio_vs_best_baseline`` (max over cells of splitinfer / min(edge_only, cloud_only,
best_fixed)), and the bars.

Run: ``python -m bench.split_pays --out FILE.json [--quick] [--edge-cpu 0.25] [--workdir runs/bench_split_pays]``
(~7 min; ``--quick``: 2 cells, few requests, 500 test images, no cgroup: the smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import e2e
from bench.planner import CpuLimit, _log

MODEL = "mobilenet_v2_fmnist"
BANDWIDTHS_MBPS = "0.25,0.5,1,2,5"
RTTS_MS = "5,20,50"
BAR_RATIO_FP32, BAR_DROP, BAR_GAIN, BAR_CELL, BAR_BOUNDARIES, BAR_INTERIOR = 100.0, 1.0, 1.15, 1.05, 3, 3
LEARNED = "bottleneck"
SHARES = (1.0, 0.5, 0.25, 0.125)
SIZES = (32, 64, 96, 128)


def codec_figures(model: str, limit: int | None) -> dict:
    """Every committed learned codec of ``model`` on the test set (see the module docstring, 1)."""
    from partitioner.codec import evaluate_codec, load_bottlenecks
    from partitioner.make import smaller_file
    from partitioner.train import model_input
    from partitioner.weights import load_default, weights_dir
    from splitinfer.bottleneck import LearnedCodec
    from splitinfer.data import load_fashion_mnist, render

    _, staged, _, info = load_default(None, model)
    plan_spec = _input_spec(model)
    side = int(plan_spec.shape[-1])
    test = load_fashion_mnist("test")
    n = limit or len(test)
    images, labels = test.images[:n], np.asarray(test.labels[:n], dtype=np.int64)
    files = [len(smaller_file(plan_spec, p)) for p in render(images, side)]
    x = model_input(images, side)
    out: dict = {"test_images": n, "input_file_bytes_mean": round(statistics.fmean(files), 1),
                 "input_file_bytes_min": min(files), "input_file": f"{side}x{side} grey image as PNG or JPEG "
                                                                   "quality 90, whichever is smaller, per sample",
                 "model_test_accuracy_committed": info.get("test_accuracy"), "codecs": []}
    for k, (bn, binfo) in sorted(load_bottlenecks(weights_dir(), model).items()):
        t0 = time.perf_counter()
        ev = evaluate_codec(staged, LearnedCodec(bn), k, x, labels)
        fp32 = int(staged.boundaries[k].fp32_bytes)
        out["codecs"].append({
            "boundary": k, "shape": list(staged.boundaries[k].shape), "config": bn.cfg.to_params(),
            "fp32_bytes": fp32, **ev.to_dict(), "ratio_vs_fp32": round(fp32 / ev.bytes_mean, 1),
            "bytes_vs_input_file": round(ev.bytes_mean / out["input_file_bytes_mean"], 4),
            "trained_by": binfo.get("command"), "seconds": round(time.perf_counter() - t0, 1)})
        _log(f"codec at {k}: {ev.bytes_mean:.1f} B/sample (x{fp32 / ev.bytes_mean:.0f} fewer than float32), "
             f"accuracy {ev.accuracy:.4f} (drop {100 * (ev.reference_accuracy - ev.accuracy):.2f} points)")
    return out


def _input_spec(model: str):
    from splitinfer.bundle import InputSpec
    from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from splitinfer.models import embedded_model

    side = embedded_model(model).size
    return InputSpec(shape=[1, side, side], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
                     labels=FASHION_MNIST_CLASSES)


def _scaled(prof, factor: float, file_bytes: int | None):
    """A copy of profile ``prof`` for an input ``factor`` times the area: stage, exit and codec times and
    feature payloads scale with the area (convolutions); split 0's payload is ``file_bytes`` when given (the
    image codec)."""
    p = dataclasses.replace(
        prof, stage_ms=[v * factor for v in prof.stage_ms], exit_ms={k: v * factor for k, v in prof.exit_ms.items()},
        encode_ms=[v * factor for v in prof.encode_ms], decode_ms=[v * factor for v in prof.decode_ms],
        payload_bytes=[int(round(v * factor)) for v in prof.payload_bytes])
    if file_bytes is not None:
        p.payload_bytes[0] = file_bytes
    return p


def _free_codec(prof):
    """A copy of a learned codec's profile as if its payload were free: 0 bytes, no encode or decode time
    (the protocol's own bytes and the RTT remain): the most any codec at these boundaries could gain."""
    n = len(prof.payload_bytes)
    return dataclasses.replace(prof, encode_ms=[0.0] * n, decode_ms=[0.0] * n, payload_bytes=[0] * n)


def sensitivity(result, bandwidths: list[float], rtts: list[float], share: float) -> dict:
    """Predicted gain of the best interior learned-codec configuration over the better of edge-only and
    cloud-only, per edge CPU share, per input size, over both, and two bounds at the measured share and size
    (see the module docstring, 3)."""
    from partitioner.cost import Link
    from partitioner.make import smaller_file
    from partitioner.search import CodecOption, Planner
    from splitinfer.data import load_fashion_mnist, render

    planner: Planner = result.planner
    n = planner.codecs[0].edge.num_stages
    spec = result.plan.input
    base_side = int(spec.shape[-1])
    test = load_fashion_mnist("test")

    def gains(p: Planner) -> dict:
        per_cell = []
        for bw in bandwidths:
            for rtt in rtts:
                est = [e for e in p.evaluate(Link(bw, rtt)) if e.accuracy_drop_points is None
                       or e.accuracy_drop_points <= BAR_DROP]
                edge = min((e.expected_latency_ms for e in est if e.split == n), default=float("inf"))
                cloud = min((e.expected_latency_ms for e in est if e.split == 0), default=float("inf"))
                inner = min((e.expected_latency_ms for e in est if 0 < e.split < n and e.codec == LEARNED),
                            default=float("inf"))
                per_cell.append(min(edge, cloud) / inner)
        wins = [g for g in per_cell if g > 1.0]
        return {"cells_interior_wins": len(wins), "cells_interior_gain_ge_1.15": sum(g >= BAR_GAIN for g in per_cell),
                "max_gain": round(max(per_cell), 3), "median_gain": round(float(np.median(per_cell)), 3)}

    def at_share(p: Planner, s: float) -> Planner:
        return p if s == share else dataclasses.replace(p, edge_slowdown=planner.edge_slowdown * share / s)

    files: dict[int, int] = {}

    def at_size(side: int) -> Planner:
        factor = (side / base_side) ** 2
        if side not in files:
            side_spec = spec.model_copy(update={"shape": [1, side, side]})
            sizes = [len(smaller_file(side_spec, im)) for im in render(test.images[:200], side)]
            files[side] = int(round(statistics.fmean(sizes)))
        fb = files[side]
        codecs = [CodecOption(c.name, _scaled(c.edge, factor, fb if c.name == "image" else None),
                              _scaled(c.server, factor, fb if c.name == "image" else None), c.boundaries,
                              c.drop_points, c.agreement) for c in planner.codecs]
        return dataclasses.replace(planner, codecs=codecs)

    by_share = {f"{s:g}": gains(at_share(planner, s)) for s in SHARES}
    by_size = {}
    for side in SIZES:
        sized = at_size(side)
        by_size[str(side)] = {"input_file_bytes_mean": files[side], **gains(sized)}
    grid = {f"{s:g}": {str(side): {k: v for k, v in gains(at_share(at_size(side), s)).items()
                                   if k in ("max_gain", "cells_interior_gain_ge_1.15")} for side in SIZES}
            for s in SHARES}
    free = [CodecOption(c.name, _free_codec(c.edge), _free_codec(c.server), c.boundaries, 0.0, 1.0)
            if c.name == LEARNED else c for c in planner.codecs]
    bounds = {
        "free_codec": {"definition": "every learned codec's payload free (0 bytes, no encode/decode time, no "
                                     "accuracy drop): the most any codec at these boundaries could gain",
                       **gains(dataclasses.replace(planner, codecs=free))},
        "no_exits": {"definition": "no configuration has early exits (edge-only runs the whole model): what the "
                                   "certified exits take from the interior split",
                     **gains(dataclasses.replace(planner, exit_boundaries=()))},
    }
    return {"definition": "predicted by the planner that made the bundle (its measured profiles; not measured "
                          "end to end): per cell of the grid, min(best edge-only, best cloud-only) / best interior "
                          "split with a learned codec; accuracy drop <= 1 point",
            "by_edge_cpu_share": by_share, "measured_share": share,
            "by_input_size": by_size, "input_size_model": f"stage, exit and codec times and feature payloads x "
                                                          f"(side / {base_side})^2; input files measured at each size",
            "by_share_and_size": grid, "bounds_at_measured_share": bounds}


def summarize(codecs: dict, cells: list[dict], n_stages: int) -> dict:
    """The issue's summary figures and bars."""
    cs = codecs["codecs"]
    interior = []
    for c in cells:
        op = c["splitinfer"]["main_op"]
        if 0 < op["split"] < n_stages and op["codec"] == LEARNED:
            interior.append(c)
    gains = [min(c["configs"]["edge_only"]["mean_ms"], c["configs"]["cloud_only"]["mean_ms"])
             / c["configs"]["splitinfer"]["mean_ms"] for c in interior]
    ratios = [c["ratio_vs_best_baseline"] for c in cells]
    out = {
        "model": MODEL,
        "boundaries_with_codec": [c["boundary"] for c in cs],
        "codec_min_ratio_vs_fp32": min((c["ratio_vs_fp32"] for c in cs), default=None),
        "codec_max_drop": max((c["drop_points"] for c in cs), default=None),
        "codec_bytes_below_input_file": bool(cs) and all(c["bytes_mean"] < codecs["input_file_bytes_mean"]
                                                         for c in cs),
        "cells": len(cells),
        "interior_cells": len(interior),
        "interior_cell_list": [{"bandwidth_mbps": c["bandwidth_mbps"], "rtt_ms": c["rtt_ms"],
                                "split": c["splitinfer"]["main_op"]["split"]} for c in interior],
        "interior_min_gain_vs_better_endpoint": round(min(gains), 4) if gains else None,
        "max_ratio_vs_best_baseline": round(max(ratios), 4) if ratios else None,
        "all_requests_answered": all(s["answered"] == s["n"] for c in cells for s in c["configs"].values()),
    }
    good = [c for c in cs if c["ratio_vs_fp32"] >= BAR_RATIO_FP32 and c["drop_points"] <= BAR_DROP
            and c["bytes_mean"] < codecs["input_file_bytes_mean"]]
    out["bars"] = {
        "ge_3_interior_boundaries_with_codec_x100_le_1pt_below_file": len(good) >= BAR_BOUNDARIES,
        "ge_3_cells_interior_with_learned_codec": len(interior) >= BAR_INTERIOR,
        "interior_cells_gain_ge_1.15": bool(gains) and min(gains) >= BAR_GAIN,
        "every_cell_ratio_le_1.05": bool(ratios) and max(ratios) <= BAR_CELL,
    }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 cells, few requests, 500 test images for "
                                                          "the codecs, no cgroup")
    ap.add_argument("--edge-cpu", type=float, default=None, help="CPU share of the edge process (default 0.25)")
    ap.add_argument("--bandwidths", default=None, help=f"Mbit/s (default {BANDWIDTHS_MBPS})")
    ap.add_argument("--rtts", default=None, help=f"ms (default {RTTS_MS})")
    ap.add_argument("--requests", type=int, default=None, help="measured requests per configuration and cell")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="profiling runs per stage")
    ap.add_argument("--codec-images", type=int, default=None, help="test images for the codec figures "
                                                                    "(default all 10,000; 500 with --quick)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_split_pays"))
    ours = ap.parse_args(argv)
    e2e_argv = ["--out", str(ours.out), "--models", MODEL, "--drop-model", "none", "--startup-s", "0",
                "--forward-files", "--workdir", str(ours.workdir),
                "--bandwidths", ours.bandwidths or ("0.25,5" if ours.quick else BANDWIDTHS_MBPS),
                "--rtts", ours.rtts or ("5" if ours.quick else RTTS_MS)]
    for flag, value in (("--edge-cpu", ours.edge_cpu), ("--requests", ours.requests), ("--rounds", ours.rounds),
                        ("--repeats", ours.repeats)):
        if value is not None:
            e2e_argv += [flag, str(value)]
    if ours.quick:
        e2e_argv.append("--quick")
    args = e2e.parse_args(e2e_argv, description=__doc__.split("\n")[0])

    from splitinfer.allocator import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: children, cgroup
    started = time.perf_counter()
    codecs = codec_figures(MODEL, ours.codec_images or (500 if ours.quick else None))
    bandwidths = [float(v) * 1e6 for v in args.bandwidths.split(",")]
    rtts = [float(v) / 1e3 for v in args.rtts.split(",")]
    share = e2e.edge_share(args, MODEL)
    limit = CpuLimit(share, name=f"{e2e.CGROUP}_{os.getpid()}")
    try:
        cells, info, _ = e2e.run_model(MODEL, args, bandwidths, rtts, args.workdir, limit, False)
    finally:
        limit.close()
    result = info.pop("plan_result")
    sens = sensitivity(result, bandwidths, rtts, share)
    summary = summarize(codecs, cells, int(info["num_stages"]))
    out = {"summary": summary, "codecs": codecs, "sensitivity": sens, "cells": cells,
           "settings": {"model": MODEL, "bandwidths_mbps": [b / 1e6 for b in bandwidths],
                        "rtts_ms": [r * 1e3 for r in rtts], "edge_cpu_share": share,
                        "requests_per_config_and_cell": args.requests or e2e.REQUESTS[MODEL],
                        "rounds": args.rounds or e2e.ROUNDS[MODEL], "quick": args.quick,
                        "agent_gets_files": True, "model_info": info, "code": e2e._code_version(),
                        "cpus": os.cpu_count()},
           "seconds": round(time.perf_counter() - started, 1)}
    ours.out.parent.mkdir(parents=True, exist_ok=True)
    ours.out.write_text(json.dumps(out, indent=1, default=str))
    print(e2e.table(cells))
    print(json.dumps(summary, indent=1))
    print(f"wrote {ours.out} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
