"""Benchmark: certified early-exit thresholds vs entropy and global-confidence baselines on the default model.

For each of ``--splits`` random calibration/test splits of the Fashion-MNIST test set (calibrate on
``--calibration-size`` images, measure on the rest) and each epsilon in ``--epsilons``:

* ours, certified: ``splitinfer.calibration.calibrate(mode="certified", path_fraction=0.5, seed=split)``;
* ours, empirical: the same greedy path, most aggressive point with calibration disagreement <= epsilon
  (``calibrate(mode="empirical")``, no guarantee);
* entropy (BranchyNet-style): one entropy threshold T shared by all exits (exit when entropy <= T), the largest
  T on a grid whose calibration disagreement is <= epsilon (uncertified, as practitioners tune it);
* global confidence: one max-softmax threshold shared by all exits, tuned the same way.

Everything is measured on the test part: disagreement / agreement with the full model, accuracy against the
labels, mean MACs per sample executed on the edge (backbone up to the answering exit plus every exit head run)
relative to the full model with exits off, and exit rates.

"Equal measured agreement": on each split our greedy path (built on the calibration part) and the entropy grid
are both evaluated on the test part; for every entropy point with agreement >= ``--min-agreement`` we take the
cheapest path point whose measured agreement is at least as high and compare mean MACs.

Run: ``python -m bench.exits --out FILE.json [--splits 100] [--calibration-size 3000]
[--epsilons 0.005,0.01,0.02,0.05] [--delta 0.05] [--png FILE.png] [--seed 0] [--workers N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from splitinfer.calibration import (
    NEVER,
    ExitScores,
    binom_upper_bound,
    calibrate,
    certify_along,
    collect_scores,
    evaluate,
    min_calibration_samples,
    threshold_path,
)

HEADLINE_EPSILON = 0.01
PATH_FRACTION = 0.5
METHODS = ("certified", "empirical", "entropy", "global_softmax")
METHOD_LABELS = {"certified": "ours (certified)", "empirical": "ours (empirical)",
                 "entropy": "entropy (BranchyNet-style)", "global_softmax": "global max-softmax"}
# Shared-threshold grids. Entropy of a 10-class softmax lies in [0, ln 10]; confident exits sit near 0,
# so the grid is geometric there. Max-softmax lies in [0.1, 1]; the grid is geometric in 1 - p.
ENTROPY_GRID = np.unique(np.concatenate([[0.0], np.geomspace(1e-5, math.log(10), 300)]))
SOFTMAX_GRID = np.unique(1.0 - np.geomspace(1e-6, 0.9, 300))

_STATE: dict = {}  # set before the worker pool forks


# ----------------------------------------------------------------------------------------------- scoring


def load_scores() -> tuple[ExitScores, ExitScores, np.ndarray, dict]:
    """max-softmax and neg-entropy scores of the default model's exits on all Fashion-MNIST test images."""
    from partitioner.weights import load_default
    from splitinfer.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, to_model_input

    _, staged, exits, info = load_default()
    ds = load_fashion_mnist("test")
    x = to_model_input(ds.images, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    ms = collect_scores(staged, exits, x, "max_softmax")
    ent = collect_scores(staged, exits, x, "neg_entropy")
    if not np.array_equal(ms.full_pred, ent.full_pred) or not np.array_equal(ms.pred, ent.pred):
        raise RuntimeError("the two scoring passes disagree on predictions")
    return ms, ent, ds.labels.astype(np.int64), info


def measure(scores: ExitScores, labels: np.ndarray, thresholds: list[float]) -> dict:
    """What a threshold vector does on a sample set, including accuracy against the labels."""
    from splitinfer.calibration import apply

    out = evaluate(scores, thresholds)
    _, answer = apply(scores, thresholds)
    return {"thresholds": [None if math.isinf(t) else float(t) for t in thresholds],
            "disagreement": out.disagreement, "agreement": 1.0 - out.disagreement,
            "accuracy": float((answer == labels).mean()), "mac_ratio": out.mean_macs / scores.full_macs,
            "exit_rate": float(sum(out.exit_rates)), "exit_rates": [float(r) for r in out.exit_rates]}


def tune_shared(cal: ExitScores, values: np.ndarray, to_threshold, epsilon: float) -> float | None:
    """Most aggressive grid value whose calibration disagreement is <= epsilon (uncertified).

    ``values`` run from conservative to aggressive; None (no exit fires) when no grid value qualifies."""
    best = None
    for v in values:  # values are ordered from conservative to aggressive by the caller
        if evaluate(cal, [to_threshold(v)] * cal.conf.shape[0]).disagreement <= epsilon:
            best = v
    return best


# ----------------------------------------------------------------------------------------------- one split


def run_split(split: int) -> dict:
    ms: ExitScores = _STATE["ms"]
    ent: ExitScores = _STATE["ent"]
    labels: np.ndarray = _STATE["labels"]
    cfg: dict = _STATE["cfg"]
    eps_list, delta = cfg["epsilons"], cfg["delta"]
    k_exits = ms.conf.shape[0]

    perm = np.random.default_rng([cfg["seed"], split]).permutation(ms.n)
    cal_idx, test_idx = perm[: cfg["calibration_size"]], perm[cfg["calibration_size"] :]
    cal_ms, test_ms = ms.subset(cal_idx), ms.subset(test_idx)
    cal_ent, test_ent = ent.subset(cal_idx), ent.subset(test_idx)
    y_test = labels[test_idx]

    # Ours, certified. calibrate() rebuilds the same greedy path for every epsilon; the path depends only on
    # the calibration part and the seed, so it is built once here with calibrate()'s own split of the
    # calibration part, and the fixed-sequence test is run per epsilon. calibrate() itself is called at the
    # headline epsilon on every split and must choose the very same thresholds.
    n_cal = cal_ms.n
    n_path = int(round(n_cal * PATH_FRACTION))
    n_test_part = n_cal - n_path
    inner = np.random.default_rng(split).permutation(n_cal)
    path_part, test_part = cal_ms.subset(inner[:n_path]), cal_ms.subset(inner[n_path:])
    path = threshold_path(path_part)
    k_path = [evaluate(test_part, lam).disagreements for lam in path]

    result: dict = {"split": split, "per_epsilon": {}}
    for eps in eps_list:
        chosen, _prefix, _p = certify_along(path, test_part, cal_ms, eps, delta)
        steps = chosen
        cert = measure(test_ms, y_test, path[chosen])
        cert.update(certified_steps=steps, path_steps=len(path), calibration_disagreements=k_path[chosen],
                    upper_bound=binom_upper_bound(k_path[chosen], n_test_part, delta))
        cert["within_epsilon"] = cert["disagreement"] <= eps
        # Best available stand-in for the true risk: the disagreement on all 10,000 images (calibration included).
        cert["pool_disagreement"] = evaluate(ms, path[chosen]).disagreement
        if eps == HEADLINE_EPSILON:
            ref = calibrate(cal_ms, eps, delta, score="max_softmax", path_fraction=PATH_FRACTION, seed=split,
                            mode="certified")
            if list(ref.thresholds) != list(path[chosen]) or ref.certified_steps != steps:
                raise RuntimeError(f"split {split}: fixed-sequence replay disagrees with calibrate()")
        result["per_epsilon"][str(eps)] = {"certified": cert}

    # Ours, empirical: greedy path on the whole calibration part (also the curve for the equal-agreement test).
    path_e = threshold_path(cal_ms)
    cal_dis = [evaluate(cal_ms, lam).disagreement for lam in path_e]
    for eps in eps_list:
        j = max(i for i, d in enumerate(cal_dis) if d <= eps)
        if split == 0 and eps == HEADLINE_EPSILON:
            ref = calibrate(cal_ms, eps, delta, mode="empirical")
            if list(ref.thresholds) != list(path_e[j]):
                raise RuntimeError("empirical replay disagrees with calibrate(mode='empirical')")
        emp = measure(test_ms, y_test, path_e[j])
        emp.update(calibration_disagreement=cal_dis[j], within_epsilon=emp["disagreement"] <= eps)
        result["per_epsilon"][str(eps)]["empirical"] = emp

    # Baselines: one shared threshold, tuned on the calibration part, measured on the test part.
    def ent_thr(t):  # exit when entropy <= T  <=>  neg_entropy >= -T
        return NEVER if t is None else -float(t)

    def sm_thr(c):
        return NEVER if c is None else float(c)

    for eps in eps_list:
        t = tune_shared(cal_ent, ENTROPY_GRID, ent_thr, eps)
        m = measure(test_ent, y_test, [ent_thr(t)] * k_exits)
        m.update(entropy_threshold=math.nan if t is None else float(t), within_epsilon=m["disagreement"] <= eps)
        result["per_epsilon"][str(eps)]["entropy"] = m
        c = tune_shared(cal_ms, SOFTMAX_GRID[::-1], sm_thr, eps)
        m = measure(test_ms, y_test, [sm_thr(c)] * k_exits)
        m.update(softmax_threshold=math.nan if c is None else float(c), within_epsilon=m["disagreement"] <= eps)
        result["per_epsilon"][str(eps)]["global_softmax"] = m

    # Curves on the test part, and the equal-measured-agreement comparison.
    ours_curve = [evaluate(test_ms, lam) for lam in path_e]
    ours_pts = np.array([[1 - o.disagreement, o.mean_macs / ms.full_macs] for o in ours_curve])
    ent_pts = np.array([[1 - o.disagreement, o.mean_macs / ms.full_macs]
                        for o in (evaluate(test_ent, [ent_thr(t)] * k_exits) for t in ENTROPY_GRID)])
    sm_pts = np.array([[1 - o.disagreement, o.mean_macs / ms.full_macs]
                       for o in (evaluate(test_ms, [float(c)] * k_exits) for c in SOFTMAX_GRID)])
    def ratios_vs(other: np.ndarray) -> list[float]:
        out = []
        for agree, mac in other:
            if agree < cfg["min_agreement"]:
                continue
            ok = ours_pts[:, 0] >= agree
            out.append(float(ours_pts[ok, 1].min() / mac) if ok.any() else math.inf)
        return out

    result["equal_agreement_ratios"] = ratios_vs(ent_pts)
    # At our certified operating point of each epsilon: the cheapest entropy threshold (chosen with hindsight on
    # the test part, the most favourable case for the baseline) reaching at least our measured agreement.
    result["operating_point_ratio_vs_entropy"] = {}
    for eps in eps_list:
        cert = result["per_epsilon"][str(eps)]["certified"]
        ok = ent_pts[:, 0] >= cert["agreement"]
        ent_mac = float(ent_pts[ok, 1].min()) if ok.any() else math.inf
        result["operating_point_ratio_vs_entropy"][str(eps)] = cert["mac_ratio"] / ent_mac
    result["equal_agreement_ratios_global"] = ratios_vs(sm_pts)
    result["entropy_curve"] = ent_pts.tolist()
    result["softmax_curve"] = sm_pts.tolist()
    if split == 0:
        result["ours_curve"] = ours_pts.tolist()
    return result


# ----------------------------------------------------------------------------------------------- report


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "std": float(a.std())}


def aggregate(results: list[dict], cfg: dict, ms: ExitScores, labels: np.ndarray, info: dict, seconds: dict) -> dict:
    n_splits = len(results)
    test_size = ms.n - cfg["calibration_size"]
    per_eps: dict = {}
    for eps in cfg["epsilons"]:
        per_eps[str(eps)] = {}
        for method in METHODS:
            rows = [r["per_epsilon"][str(eps)][method] for r in results]
            entry = {key: _stats([row[key] for row in rows])
                     for key in ("disagreement", "agreement", "accuracy", "mac_ratio", "exit_rate")}
            entry["exit_rates_mean"] = np.mean([row["exit_rates"] for row in rows], axis=0).tolist()
            entry["splits_within_epsilon"] = int(sum(row["within_epsilon"] for row in rows))
            if method == "certified":
                entry["upper_bound"] = _stats([row["upper_bound"] for row in rows])
                entry["pool_disagreement"] = _stats([row["pool_disagreement"] for row in rows])
                entry["splits_pool_disagreement_within_epsilon"] = int(sum(row["pool_disagreement"] <= eps
                                                                           for row in rows))
                entry["splits_with_no_exit_certified"] = int(sum(row["certified_steps"] == 0 for row in rows))
            if method == "entropy":
                entry["entropy_threshold"] = _stats([row["entropy_threshold"] for row in rows])
            if method == "global_softmax":
                entry["softmax_threshold"] = _stats([row["softmax_threshold"] for row in rows])
            per_eps[str(eps)][method] = entry

    head = per_eps[str(HEADLINE_EPSILON)]["certified"]
    ratios = [x for r in results for x in r["equal_agreement_ratios"]]
    not_later = sum(x <= 1.0 for x in ratios)
    ratios_g = [x for r in results for x in r["equal_agreement_ratios_global"]]
    op_ratios = [r["operating_point_ratio_vs_entropy"][str(HEADLINE_EPSILON)] for r in results]
    std_noise = math.sqrt(HEADLINE_EPSILON * (1 - HEADLINE_EPSILON) / test_size)
    summary = {
        "splits": n_splits,
        "splits_within_epsilon": head["splits_within_epsilon"],
        "epsilon": HEADLINE_EPSILON,
        "delta": cfg["delta"],
        "mac_ratio_exits_on_vs_off": head["mac_ratio"]["mean"],
        "mac_ratio_exits_on_vs_off_max": head["mac_ratio"]["max"],
        "calibration_size": cfg["calibration_size"],
        "test_size": test_size,
        "mean_test_disagreement": head["disagreement"]["mean"],
        "max_test_disagreement": head["disagreement"]["max"],
        "mean_test_agreement": head["agreement"]["mean"],
        "mean_test_accuracy": head["accuracy"]["mean"],
        "full_model_accuracy": float((ms.full_pred == labels).mean()),
        "mean_certified_upper_bound": head["upper_bound"]["mean"],
        "splits_pool_disagreement_within_epsilon": head["splits_pool_disagreement_within_epsilon"],
        # At equal measured agreement, averaged over the splits: our certified operating point vs the cheapest
        # entropy threshold reaching the same agreement (per-split counts and the worst case follow).
        "exits_at_least_as_early_as_entropy": bool(op_ratios) and float(np.mean(op_ratios)) <= 1.0,
        "operating_point_splits_not_later_than_entropy": sum(r <= 1.0 for r in op_ratios),
        "operating_point_mean_mac_ratio_ours_over_entropy": float(np.mean(op_ratios)) if op_ratios else None,
        "operating_point_worst_mac_ratio_ours_over_entropy": max(op_ratios) if op_ratios else None,
        "curve_every_level_not_later_than_entropy": bool(ratios) and not_later == len(ratios),
        "equal_agreement_comparisons": len(ratios),
        "equal_agreement_fraction_ours_not_later": not_later / len(ratios) if ratios else None,
        "equal_agreement_worst_mac_ratio_ours_over_entropy": max(ratios) if ratios else None,
        "equal_agreement_mean_mac_ratio_ours_over_entropy": float(np.mean(ratios)) if ratios else None,
        "equal_agreement_min_agreement": cfg["min_agreement"],
        "equal_agreement_vs_global_softmax_fraction_ours_not_later":
            sum(x <= 1.0 for x in ratios_g) / len(ratios_g) if ratios_g else None,
        "equal_agreement_vs_global_softmax_mean_mac_ratio": float(np.mean(ratios_g)) if ratios_g else None,
        "equal_agreement_vs_global_softmax_worst_mac_ratio": max(ratios_g) if ratios_g else None,
        "must_show": {
            "within_epsilon_in_at_least_95_percent_of_splits": head["splits_within_epsilon"] >= 0.95 * n_splits,
            "mac_ratio_at_most_0.5": head["mac_ratio"]["mean"] <= 0.5,
            "not_later_than_entropy_at_equal_agreement_on_average":
                bool(op_ratios) and float(np.mean(op_ratios)) <= 1.0,
        },
        "note": (f"Certified thresholds bound the true disagreement rate (with probability >= 1 - delta over the "
                 f"calibration draw); the disagreement measured on {test_size} test images fluctuates around the "
                 f"true rate with a binomial standard deviation of about {std_noise:.4f} at a true rate of "
                 f"{HEADLINE_EPSILON}, which is why a large test part is used. Calibration part "
                 f"{cfg['calibration_size']} = {int(round(cfg['calibration_size'] * PATH_FRACTION))} path + "
                 f"{cfg['calibration_size'] - int(round(cfg['calibration_size'] * PATH_FRACTION))} test images "
                 f"(path_fraction {PATH_FRACTION}). MAC ratios are relative to the full model with exits off "
                 f"({ms.full_macs} MACs) and include every exit head run."),
        "seconds": seconds,
    }
    ent_curve = np.mean([r["entropy_curve"] for r in results], axis=0)
    sm_curve = np.mean([r["softmax_curve"] for r in results], axis=0)
    return {
        "summary": summary,
        "per_epsilon": {e: {m: v for m, v in d.items() if m in ("certified", "empirical")}
                        for e, d in per_eps.items()},
        "baselines": {e: {m: v for m, v in d.items() if m in ("entropy", "global_softmax")}
                      for e, d in per_eps.items()},
        "curves": {
            "description": "test-part (agreement, mac_ratio); entropy and global curves averaged over splits per "
                           "grid value, ours = greedy path of split 0",
            "entropy_grid": ENTROPY_GRID.tolist(), "entropy": ent_curve.tolist(),
            "softmax_grid": SOFTMAX_GRID.tolist(), "global_softmax": sm_curve.tolist(),
            "ours_split0": results[0]["ours_curve"],
        },
        "per_split": [{"split": r["split"], **{k: r["per_epsilon"][str(HEADLINE_EPSILON)]["certified"][k] for k in (
            "thresholds", "disagreement", "pool_disagreement", "calibration_disagreements", "upper_bound", "mac_ratio",
            "certified_steps", "path_steps")}} for r in results],
        "config": {**cfg, "path_fraction": PATH_FRACTION, "boundaries": ms.boundaries, "macs_to": ms.macs_to,
                   "exit_macs": ms.exit_macs, "full_macs": ms.full_macs, "scores": {
                       "ours": "max_softmax", "entropy": "neg_entropy", "global_softmax": "max_softmax"},
                   "model_test_accuracy": info.get("test_accuracy"), "weights_sha256": info.get("sha256")},
    }


def print_table(report: dict) -> None:
    s = report["summary"]
    print(f"\nEarly exits on the default model: {s['splits']} splits, calibration {s['calibration_size']} / "
          f"test {s['test_size']}, delta={s['delta']}; full model accuracy {s['full_model_accuracy']:.4f}")
    hdr = f"{'eps':>6}  {'method':<27}{'agree':>8}{'acc':>8}{'MACs/off':>10}{'exit rate':>11}{'max dis':>9}  within"
    print(hdr)
    print("-" * len(hdr))
    for eps, d in report["per_epsilon"].items():
        rows = {**d, **report["baselines"][eps]}
        for method in METHODS:
            r = rows[method]
            print(f"{eps:>6}  {METHOD_LABELS[method]:<27}{r['agreement']['mean']:>8.4f}{r['accuracy']['mean']:>8.4f}"
                  f"{r['mac_ratio']['mean']:>10.3f}{r['exit_rate']['mean']:>11.3f}{r['disagreement']['max']:>9.4f}"
                  f"  {r['splits_within_epsilon']:>3}/{s['splits']}")
    print(f"\nheadline (eps={s['epsilon']}): disagreement <= eps in {s['splits_within_epsilon']}/{s['splits']} splits "
          f"(mean {s['mean_test_disagreement']:.4f}, max {s['max_test_disagreement']:.4f}); MACs exits on/off "
          f"{s['mac_ratio_exits_on_vs_off']:.3f} (max {s['mac_ratio_exits_on_vs_off_max']:.3f})")
    if s["operating_point_mean_mac_ratio_ours_over_entropy"] is not None:
        print(f"at our certified operating point (eps={s['epsilon']}), vs the cheapest entropy threshold with at least "
              f"the same measured agreement: MAC ratio ours/entropy mean "
              f"{s['operating_point_mean_mac_ratio_ours_over_entropy']:.3f}, worst "
              f"{s['operating_point_worst_mac_ratio_ours_over_entropy']:.3f}; ours not later in "
              f"{s['operating_point_splits_not_later_than_entropy']}/{s['splits']} splits")
    frac = s["equal_agreement_fraction_ours_not_later"]
    if frac is not None:
        print(f"whole curves, equal measured agreement (>= {s['equal_agreement_min_agreement']}): ours not later than "
              f"entropy in {frac:.1%} of {s['equal_agreement_comparisons']} comparisons; worst MAC ratio ours/entropy "
              f"{s['equal_agreement_worst_mac_ratio_ours_over_entropy']:.3f}, mean "
              f"{s['equal_agreement_mean_mac_ratio_ours_over_entropy']:.3f}")
    frac = s["equal_agreement_vs_global_softmax_fraction_ours_not_later"]
    if frac is not None:
        print(f"  same against the global max-softmax threshold: {frac:.1%}; MAC ratio ours/global mean "
              f"{s['equal_agreement_vs_global_softmax_mean_mac_ratio']:.3f}, worst "
              f"{s['equal_agreement_vs_global_softmax_worst_mac_ratio']:.3f}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, curves = report["summary"], report["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    ax = axes[0]
    for key, colour, label in (("entropy", "tab:orange", "entropy threshold (mean over splits)"),
                               ("global_softmax", "tab:green", "global max-softmax (mean over splits)"),
                               ("ours_split0", "tab:blue", "ours: greedy path (split 0)")):
        pts = np.asarray(curves[key])
        ax.plot(pts[:, 1], pts[:, 0], color=colour, lw=1, alpha=0.7, label=label)
    markers = {"certified": ("tab:blue", "o"), "empirical": ("tab:purple", "s"),
               "entropy": ("tab:orange", "^"), "global_softmax": ("tab:green", "v")}
    for ax_i, metric in ((0, "agreement"), (1, "accuracy")):
        for method, (colour, marker) in markers.items():
            xs, ys = [], []
            for eps in report["per_epsilon"]:
                r = {**report["per_epsilon"][eps], **report["baselines"][eps]}[method]
                xs.append(r["mac_ratio"]["mean"])
                ys.append(r[metric]["mean"])
            axes[ax_i].plot(xs, ys, marker=marker, color=colour, ls="none", ms=7,
                            label=f"{METHOD_LABELS[method]} tuned at eps")
            if method == "certified":
                for x, y, eps in zip(xs, ys, report["per_epsilon"], strict=True):
                    axes[ax_i].annotate(f"eps={eps}", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.plot([1.0], [1.0], marker="*", color="k", ms=12, ls="none", label="exits off (full model)")
    ax.set_ylim(0.94, 1.002)
    ax.set_xlabel("mean MACs per sample on the edge / exits off")
    ax.set_ylabel("agreement with the full model (test part)")
    ax.set_title(f"Agreement vs cost, {s['splits']} splits, delta={s['delta']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.axhline(s["full_model_accuracy"], color="k", ls="--", lw=1, label="full model accuracy")
    ax.plot([1.0], [s["full_model_accuracy"]], marker="*", color="k", ms=12, ls="none")
    ax.set_xlabel("mean MACs per sample on the edge / exits off")
    ax.set_ylabel("accuracy vs labels (test part)")
    ax.set_title("Accuracy vs cost (means over splits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.exits", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="JSON report")
    ap.add_argument("--png", type=Path, default=None, help="plot (default: next to --out, same stem)")
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--calibration-size", type=int, default=3000)
    ap.add_argument("--epsilons", default="0.005,0.01,0.02,0.05")
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--min-agreement", type=float, default=0.97,
                    help="lowest entropy-baseline agreement included in the equal-agreement comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    epsilons = sorted({float(e) for e in args.epsilons.split(",") if e.strip()} | {HEADLINE_EPSILON})

    t0 = time.perf_counter()
    ms, ent, labels, info = load_scores()
    t_scores = time.perf_counter() - t0
    if not 0 < args.calibration_size < ms.n:
        raise SystemExit(f"--calibration-size must lie in (0, {ms.n})")
    n_test_part = args.calibration_size - int(round(args.calibration_size * PATH_FRACTION))
    for eps in epsilons:
        if n_test_part < min_calibration_samples(eps, args.delta):
            raise SystemExit(f"--calibration-size {args.calibration_size} cannot certify epsilon={eps} at delta="
                             f"{args.delta}: the test part needs {min_calibration_samples(eps, args.delta)} samples")
    cfg = {"splits": args.splits, "calibration_size": args.calibration_size, "epsilons": epsilons,
           "delta": args.delta, "seed": args.seed, "min_agreement": args.min_agreement, "workers": args.workers}
    _STATE.update(ms=ms, ent=ent, labels=labels, cfg=cfg)

    t1 = time.perf_counter()
    results: list[dict] = []
    if args.workers > 1:
        with mp.get_context("fork").Pool(args.workers) as pool:
            for r in pool.imap(run_split, range(args.splits)):
                results.append(r)
                print(f"\rsplit {len(results)}/{args.splits}", end="", file=sys.stderr, flush=True)
    else:
        for i in range(args.splits):
            results.append(run_split(i))
            print(f"\rsplit {i + 1}/{args.splits}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    t_splits = time.perf_counter() - t1
    seconds = {"scores": round(t_scores, 1), "splits": round(t_splits, 1),
               "total": round(time.perf_counter() - t0, 1)}

    report = aggregate(results, cfg, ms, labels, info, seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    png = args.png or args.out.with_suffix(".png")
    plot(report, png)
    print_table(report)
    print(f"\nwrote {args.out} and {png} ({seconds['total']} s)")
    return report


if __name__ == "__main__":
    main()
