"""Benchmark: joint planning (split, head variant, codec, exits) against sequential planning (the best fp32
plan, then the best compressed head at its split), the end-to-end certificate, and planning time.

On the default model with a Raspberry Pi 4-class edge (``--device raspberry-pi-4``: its compute slowdown over
this machine's profile and its power model):

1. **Planning time.** ``make_default_plan`` with every committed head variant (``head_variants="all"``) and
   today's call (fp32 only), same link, device, epsilon and constraints, timed in this process: one untimed
   warm-up plan, then two alternations of joint and today's; the means.
2. **Joint vs sequential** over the cells of ``bench.planner`` (bandwidths x RTTs). Both use the joint plan's
   measurements and the same constraints (``--max-accuracy-drop`` points and certified at ``--epsilon`` end to
   end): *joint* = the best feasible configuration over every variant; *sequential* = the best feasible fp32
   configuration, then, keeping its split, codec and exits, the variant with the lowest predicted latency that
   stays feasible. Predicted latencies are compared per cell.
3. **End-to-end certification** on the planner's chosen deployed system (variant, split, codec, exit subset
   as planned at ``--bandwidth``/``--rtt``): the ``bench.exits`` protocol on the Fashion-MNIST test set,
   ``--splits`` random calibration/test splits (``--calibration-size`` images to calibrate the exits' thresholds
   on the final answers with :func:`splitinfer.calibration.calibrate`, the rest to measure), counting the splits
   whose measured disagreement with the full fp32 model stays within epsilon. At the other ``--epsilons`` the
   system is the one the planner chooses at that epsilon (from the same measurements), reported with the
   configurations it had to reject for it (their end-to-end bound above epsilon) and the part that costs most.

4. **Verification through the link emulator** (``--verify-cells N``, default all 15): a cloud server (1 thread, 1
   worker) and an edge worker (:mod:`bench.edge_worker`, the real edge runtime, this machine at 1 thread) per bundle
   this run wrote: today's (fp32) and the joint plan's (its head variant). The edge is profiled in its worker first
   (``4 * --repeats`` walks) and the joint search re-planned for it (every planner's ``edge_slowdown`` = the worker's
   fp32 stage time / the planning profile's, sums of stage medians, plus the agent's measured per-request overhead,
   as ``bench.planner`` does, and its per-exit overhead: edge-only without exits against every exit at a threshold
   none reaches, interleaved, minus the profiled exit heads; the Raspberry Pi 4 is a prediction, the worker is what
   runs). Per cell, behind ``python -m bench.linkemu`` at the cell's rate and RTT (probed as ``plan probe`` does):
   the joint choice for the probed link, the 5 next-best feasible configurations the bundles can run, the sequential
   plan's and fp32 edge-only, measured as ``bench.planner`` measures splits (20 discarded requests, then 34 measured;
   an offloading configuration whose lower bound exceeds the best mean is skipped), then the choice and those within
   2x of the best in 8 interleaved rounds of 100 requests each (the order rotated every round), pooled:
   configurations a few percent apart at ~1 ms need that many requests under the same conditions. The screening pass
   and each round answer different test images (834 in all), the same ones for every configuration. A cell is
   verified when the choice measures within 1.05x of the best measured configuration; a choice whose head variant has
   no bundle here is reported unverified. Every configuration runs with the exit thresholds the search assumed for it
   (its share of epsilon; the edge worker's ``set`` takes them), so what is measured is what was predicted; the
   bundle itself carries the thresholds certified for the deployed system, and the choice also runs with those in the
   same rounds (``choice_deployed_ms``, reported beside, not a candidate). Until stop 36 every configuration ran with
   the bundle's thresholds, so the search's ranking was checked against configurations that exited differently from
   their prediction.

Run: ``python -m bench.joint --out FILE.json [--png FILE.png] [--variants all] [--splits 100]`` (~7 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CELL_BANDWIDTHS = (0.5e6, 2e6, 10e6, 50e6, 200e6)  # as bench.planner
CELL_RTTS = (0.005, 0.05, 0.15)
VERIFY_OTHERS = 5  # per verified cell: the choice plus this many other feasible configurations, best predicted first
VERIFY_MARGIN = 1.05  # a cell is verified when the choice measures within this factor of the best measured
VERIFY_ROUNDS = 8  # interleaved rounds of bench.planner's REQUESTS per contender after the screening pass
VERIFY_CONTENDER_MARGIN = 2.0  # screened configurations within this factor of the best go on to the rounds: 34
# requests of ~1 ms are noisy (screens of 1.6-2.1 ms for configurations that measured ~1.1 ms over the rounds of
# other cells), and a narrow margin let a noisy screen decide which configurations the choice is judged against
VERIFY_WARMUP = 20  # discarded requests before a configuration's screening pass (its first requests run slow)
VERIFY_INPUTS = 900  # test images per edge worker: the screening pass and every round answer different ones, and
# every configuration the same ones (exit rates on 100 images differ from the search's by several points)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def plan_both(workdir: Path, link, device, epsilon: float, delta: float, max_drop: float, repeats: int,
              variants: str, validation_limit: int | None = None, rounds: int = 2):
    """The joint plan and today's plan of the default model, timed: one untimed warm-up plan (the process's
    one-time costs), then ``rounds`` alternations of joint and today's; the mean of each."""
    from partitioner.make import make_default_plan
    from partitioner.search import Constraints

    cons = Constraints(max_accuracy_drop=max_drop)
    common = dict(device=device, edge_slowdown=device.compute_slowdown, epsilon=epsilon, delta=delta,
                  repeats=repeats, constraints=cons, validation_limit=validation_limit)
    make_default_plan(workdir / "warmup", link, **common)
    times: dict[str, list[float]] = {"joint": [], "today": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        joint = make_default_plan(workdir / "joint", link, head_variants=variants, **common)
        t1 = time.perf_counter()
        today = make_default_plan(workdir / "today", link, **common)
        times["joint"].append(t1 - t0)
        times["today"].append(time.perf_counter() - t1)
    return joint, today, {"joint_s": round(float(np.mean(times["joint"])), 2),
                          "today_s": round(float(np.mean(times["today"])), 2),
                          "joint_runs_s": [round(t, 2) for t in times["joint"]],
                          "today_runs_s": [round(t, 2) for t in times["today"]]}


def time_cli(workdir: Path, bandwidth_mbps: float, rtt_ms: float, device: str, epsilon: float, delta: float,
             max_drop: float, repeats: int, variants: str, rounds: int = 2) -> dict:
    """Wall time of ``splitinfer plan make`` as a user runs it (a new process: start-up, imports, data, planning,
    the bundle written), with ``--head-variants`` and without, same link, device, epsilon and constraints: one
    untimed run of each (the page cache), then ``rounds`` alternations; the means."""
    common = ["--bandwidth", f"{bandwidth_mbps:g}mbit", "--rtt", f"{rtt_ms:g}ms", "--device", device,
              "--epsilon", str(epsilon), "--delta", str(delta), "--max-accuracy-drop", str(max_drop),
              "--repeats", str(repeats)]
    cli = [sys.executable, "-m", "splitinfer", "plan", "make"]
    runs = {"joint": cli + ["--out", str(workdir / "cli-joint")] + common + ["--head-variants", variants],
            "today": cli + ["--out", str(workdir / "cli-today")] + common}
    times: dict[str, list[float]] = {"joint": [], "today": []}
    for i in range(rounds + 1):
        for name, cmd in runs.items():
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    return {"cli_joint_s": round(float(np.mean(times["joint"])), 2),
            "cli_today_s": round(float(np.mean(times["today"])), 2),
            "cli_joint_runs_s": [round(t, 2) for t in times["joint"]],
            "cli_today_runs_s": [round(t, 2) for t in times["today"]]}


def sequential(search, link, objective, cons):
    """The best fp32 configuration, then the fastest feasible variant at its split, codec and exits."""
    from partitioner.search import choose_among

    fp32 = choose_among([e for e in search.evaluate(link) if e.head == "fp32"], objective, cons, search.judge)
    same = [e for e in search.evaluate(link) if e.split == fp32.split and e.codec == fp32.codec
            and e.exits == fp32.exits]
    best = fp32
    for e in sorted(same, key=lambda e: e.expected_latency_ms):
        if e.expected_latency_ms >= best.expected_latency_ms:
            break
        if cons.admits(e):
            search.judge(e)
            if cons.admits(e):
                best = e
                break
    return fp32, best


def describe(e) -> dict:
    return {"head": e.head, "exit_share": e.exit_share, "split": e.split, "codec": e.codec, "exits": list(e.exits),
            "predicted_ms": round(e.expected_latency_ms, 4), "accuracy_drop_points": e.accuracy_drop_points,
            "disagreement": e.disagreement, "disagreement_bound": e.disagreement_bound,
            "bytes_per_request": round(e.expected_bytes or 0.0, 1), "edge_memory_bytes": e.edge_memory_bytes,
            "bundle_bytes": e.bundle_bytes}


def compare_cells(jr, objective, cons) -> list[dict]:
    from partitioner.cost import Link

    cells = []
    for bw in CELL_BANDWIDTHS:
        for rtt in CELL_RTTS:
            link = Link(bw, rtt)
            joint = jr.search.choose(link, objective, cons)
            fp32, seq = sequential(jr.search, link, objective, cons)
            cells.append({"bandwidth_mbps": bw / 1e6, "rtt_ms": rtt * 1e3, "joint": describe(joint),
                          "sequential": describe(seq), "fp32_plan": describe(fp32),
                          "ratio": round(joint.expected_latency_ms / seq.expected_latency_ms, 4)})
    return cells


def system_on_test(jr, chosen, test) -> object:
    """Configuration ``chosen``'s deployed system on the Fashion-MNIST test set: its variant's exit scores, its
    final fallback answers, the fp32 model's answers as reference."""
    import torch

    from partitioner.joint import image_roundtrip, system_scores
    from partitioner.train import model_input

    ev = next(x for x in jr.evals if x.name == chosen.head)
    x = model_input(test.images, 28)
    fp32 = jr.evals[0].variant.staged
    with torch.inference_mode():
        reference = fp32.run(x, 0, fp32.num_stages).argmax(1).numpy()
    rt = image_roundtrip(jr.inputs.spec, test.images) if chosen.codec == "image" else None
    return system_scores(ev, chosen.split, chosen.codec, chosen.exits, jr.inputs.exits, x, reference,
                         "max_softmax", rt)


def certification(system, labels, epsilons, delta: float, splits: int, calibration_size: int, seed: int) -> dict:
    """The bench.exits protocol on the deployed system: per epsilon, how many random splits keep the measured
    disagreement with the fp32 model within epsilon (a split whose calibration cannot certify even 'no exit'
    is counted as rejected, not as within)."""
    from splitinfer.calibration import CalibrationTooSmall, apply, calibrate, evaluate

    out = {}
    for eps in epsilons:
        within, rejected, dis, exit_rates = 0, 0, [], []
        for s in range(splits):
            perm = np.random.default_rng([seed, s]).permutation(system.n)
            cal, test = system.subset(perm[:calibration_size]), system.subset(perm[calibration_size:])
            try:
                c = calibrate(cal, eps, delta, seed=s)
            except CalibrationTooSmall:
                rejected += 1
                continue
            o = evaluate(test, c.thresholds)
            dis.append(o.disagreement)
            exit_rates.append(sum(o.exit_rates))
            within += o.disagreement <= eps
        _, answer = apply(system, [math.inf] * len(system.boundaries))
        out[str(eps)] = {"within": within, "rejected": rejected, "splits": splits,
                         "disagreement_mean": round(float(np.mean(dis)), 5) if dis else None,
                         "disagreement_max": round(float(np.max(dis)), 5) if dis else None,
                         "exit_rate_mean": round(float(np.mean(exit_rates)), 4) if exit_rates else None,
                         "no_exit_disagreement": round(float((answer != system.ref).mean()), 5),
                         "system_accuracy_no_exit": round(float((answer == labels).mean()), 5),
                         "fp32_accuracy": round(float((system.ref == labels).mean()), 5)}
    return out


def rejected_at(jr, link, objective, cons, eps: float):
    """What the planner chooses when certified at ``eps`` and the configurations ranked above it that failed
    the end-to-end screen (with the part costing most, for the first few)."""
    from partitioner.joint import costliest_part, planner_of
    from partitioner.search import ranked

    c = dataclasses.replace(cons, epsilon=eps)
    rejected = []
    chosen = None
    for e in ranked([e for e in jr.search.evaluate(link) if c.admits(e)], objective):
        jr.search.judge(e)
        if c.admits(e):
            chosen = e
            break
        if len(rejected) < 5:
            ev = next(x for x in jr.evals if x.name == e.head)
            why = costliest_part(ev, e.split, e.codec, e.exits, planner_of(jr.search.planners, e).system)
            rejected.append({**describe(e), "costliest_part": why})
        else:
            rejected.append(None)
    return chosen, {"chosen": describe(chosen) if chosen else None, "rejected_count": len(rejected),
                    "rejected_first": [r for r in rejected if r is not None]}


# ------------------------------------------------------------------------------- verification over the link


def exit_overhead(worker, n_stages: int, exit_ms: dict[int, float], rounds: int = VERIFY_ROUNDS) -> float:
    """The edge agent's own work per exit evaluated, beyond the profiled exit head (worker milliseconds):
    edge-only without exits against edge-only with every exit at a threshold none reaches (the same stages for
    every request, every exit evaluated), in interleaved rounds; the difference per exit minus the exits'
    profiled mean time."""
    from bench.planner import REQUESTS, measure

    exits = sorted(exit_ms)
    if not exits:
        return 0.0
    never = {b: math.inf for b in exits}
    bare: list[float] = []
    every: list[float] = []
    for r in range(rounds):
        offset = r * REQUESTS["default"]
        for which in ((bare, every) if r % 2 == 0 else (every, bare)):
            which.extend(measure(worker, REQUESTS["default"], n_stages, None, [] if which is bare else exits,
                                 None if which is bare else never, offset=offset))
    per_exit = (statistics.fmean(every) - statistics.fmean(bare)) / len(exits)
    return per_exit - statistics.fmean(exit_ms.values())


def edge_scale(measured, planned) -> float:
    """How many times slower the edge worker runs fp32's stages than the planning profile says: the ratio of
    their stage medians' sums (the planning profile's stage times are medians of interleaved walks,
    :func:`partitioner.joint.profile_variants`; a mean would let one slow spell in the worker's profile move
    every prediction of the verification)."""
    def total(p) -> float:
        return sum(s.p50 for s in p.stage_ms_stats) if p.stage_ms_stats else sum(p.stage_ms)

    return total(measured) / max(1e-9, total(planned))


def verification_search(jr, scale: float, overhead_ms: float, exit_overhead_ms: float = 0.0):
    """The joint search with the edge as measured in the edge worker: every planner's ``edge_slowdown`` set to the
    measured ratio of the worker's fp32 stage times to the planning profile's (the profiles were measured in this
    process; the worker is this machine at 1 thread), and the agent's measured overheads added, per request (as
    ``bench.planner`` does) and per exit evaluated (:func:`exit_overhead`); worker milliseconds, so divided by
    ``scale``, which the cost model multiplies every edge time by. The end-to-end judge (disagreement) is shared:
    it does not depend on latency."""
    from partitioner.joint import JointSearch

    planners = {}
    for key, p in jr.search.planners.items():
        codecs = [dataclasses.replace(c, edge=dataclasses.replace(c.edge, request_overhead_ms=overhead_ms / scale,
                                                                  exit_overhead_ms=exit_overhead_ms / scale))
                  for c in p.codecs]
        planners[key] = dataclasses.replace(p, codecs=codecs, edge_slowdown=scale)
    return JointSearch(planners)


def _config(e) -> tuple:
    """What an edge worker runs: head variant, split, codec, exit subset (the bundle fixes the thresholds)."""
    return (e.head, e.split, e.codec, tuple(e.exits))


def verify_cell(search, workers: dict, bw: float, rtt: float, probed: dict, objective, cons, n_stages: int,
                thresholds_of=lambda e: None, others: int = VERIFY_OTHERS) -> dict:
    """One cell through the link emulator: the joint choice for the probed link, and the ``others`` best other
    feasible configurations the workers can run (a bundle per head variant), plus the sequential plan's and
    fp32's edge-only, each measured as ``bench.planner`` measures splits (``VERIFY_WARMUP`` discarded, then
    ``SCREEN`` requests; those within 2x of the best, and the choice, ``VERIFY_ROUNDS`` x ``REQUESTS`` more,
    pooled). An offloading configuration is skipped when a lower bound of its mean (offloaded share x (transfer
    + RTT)) already exceeds the best measured mean.

    Each configuration runs with the exit thresholds its search assumed (``thresholds_of(e)``; the bundle's
    when None), so what is measured is what was predicted. The choice also runs, in the same rounds, with the
    bundle's thresholds (certified for the deployed system): ``choice_deployed_ms``, reported beside, not a
    candidate."""
    from bench.planner import REQUESTS, SCREEN, measure
    from partitioner.cost import Link
    from partitioner.search import ranked

    link = Link(probed["bandwidth_bps"] or bw, probed["rtt_ms"] / 1e3)
    choice = search.choose(link, objective, cons)
    cell = {"bandwidth_mbps": bw / 1e6, "rtt_ms": rtt * 1e3, "probed": probed, "choice": describe(choice)}
    if choice.head not in workers:
        cell["unverified"] = f"no bundle of head variant {choice.head} in this run (bundles: {sorted(workers)})"
        return cell
    picked = {_config(choice): choice}
    _fp32, seq = sequential(search, link, objective, cons)
    extra = [seq, *[e for e in search.evaluate(link) if e.head == "fp32" and e.split == n_stages and not e.exits]]
    for e in ranked([e for e in search.evaluate(link) if cons.admits(e)], objective):
        if len(picked) > others:
            break
        if e.head in workers and _config(e) not in picked:
            search.judge(e)
            if cons.admits(e):
                picked[_config(e)] = e
    for e in extra:
        if e.head in workers and _config(e) not in picked:
            picked[_config(e)] = e
    samples: dict[tuple, list[float]] = {}
    skipped, failed = [], {}
    best = float("inf")
    for key, e in picked.items():
        if e.offload_rate > 0 and key != _config(choice):
            bound = e.offload_rate * (e.bytes_per_offload * 8 / bw + rtt) * 1e3
            if bound >= best:
                skipped.append(describe(e))
                continue
        try:
            measure(workers[e.head], VERIFY_WARMUP, e.split, e.codec, list(e.exits), thresholds_of(e),
                    offset=VERIFY_INPUTS - VERIFY_WARMUP)  # discarded: a configuration's first requests run slow
            samples[key] = measure(workers[e.head], SCREEN["default"], e.split, e.codec, list(e.exits),
                                   thresholds_of(e))
        except RuntimeError as exc:
            if key == _config(choice):
                raise
            failed[str(key)] = str(exc)
            continue
        best = min(best, statistics.fmean(samples[key]))
    # the contenders, and the choice, in interleaved rounds (the order rotated each round): configurations a few
    # percent apart at ~1 ms need hundreds of requests each, measured under the same conditions of the machine
    contenders = [k for k, v in samples.items() if statistics.fmean(v) <= VERIFY_CONTENDER_MARGIN * best
                  or k == _config(choice)]
    deployed = ("deployed", *_config(choice))
    contenders.append(deployed)
    deployed_samples: list[float] = []
    for r in range(VERIFY_ROUNDS):
        for key in contenders[r % len(contenders):] + contenders[: r % len(contenders)]:
            e = choice if key == deployed else picked[key]
            got = measure(workers[e.head], REQUESTS["default"], e.split, e.codec, list(e.exits),
                          None if key == deployed else thresholds_of(e),
                          offset=SCREEN["default"] + r * REQUESTS["default"])
            (deployed_samples if key == deployed else samples[key]).extend(got)
    means = {k: statistics.fmean(v) for k, v in samples.items()}
    oracle = min(means, key=means.get)
    ratio = means[_config(choice)] / means[oracle]
    cell.update({
        "choice_measured_ms": round(means[_config(choice)], 3),
        "choice_deployed_ms": round(statistics.fmean(deployed_samples), 3), "oracle": {**describe(picked[oracle]),
                                                                          "measured_ms": round(means[oracle], 3)},
        "ratio": round(ratio, 4), "verified": ratio <= VERIFY_MARGIN,
        "measured": [{**describe(picked[k]), "measured_ms": round(means[k], 3), "n": len(samples[k]),
                      "p50_ms": round(statistics.median(samples[k]), 3)} for k in samples],
        "skipped": skipped, "failed": failed})
    return cell


def verify(jr, bundles: dict[str, Path], workdir: Path, objective, cons, grid: list[tuple[float, float]],
           repeats: int) -> dict:
    """Verify the joint choice cell by cell through ``bench.linkemu`` (see the module docstring): a cloud server
    and an edge worker per bundle (head variant), the edge profiled in its worker first."""
    from bench.planner import CpuLimit, EdgeWorker, probe_link, start_emulator, start_server
    from partitioner.profile import Profile

    wd = workdir / "verify"
    wd.mkdir(parents=True, exist_ok=True)
    limit = CpuLimit(1.0)
    workers, servers, ports = {}, {}, {}
    cells: list[dict] = []
    try:
        for head, path in bundles.items():
            servers[head], ports[head] = start_server(path, wd)
            workers[head] = EdgeWorker(path, VERIFY_INPUTS, wd / f"edge-{head}.log", limit)
        for head, worker in workers.items():  # every worker loaded before any profile: no start-up beside it
            worker.call(cmd="connect", address=f"127.0.0.1:{ports[head]}")
        fp32_edge = jr.evals[0].edge
        measured = Profile.from_dict(workers["fp32"].call(cmd="profile", repeats=4 * repeats)["profile"])
        scale = edge_scale(measured, fp32_edge)
        overhead = float(workers["fp32"].call(cmd="overhead", n=30)["overhead_ms"])
        per_exit = exit_overhead(workers["fp32"], measured.num_stages, measured.exit_ms)
        search = verification_search(jr, scale, max(0.0, overhead), max(0.0, per_exit))
        evals = {ev.name: ev for ev in jr.evals}

        def thresholds_of(e) -> dict[int, float] | None:  # the exit thresholds the search assumed for e
            ev = evals.get(e.head)
            if ev is None or e.exit_share is None or e.exit_share not in ev.calibrations or not e.exits:
                return None
            return {b: t for b, t in ev.thresholds(e.exit_share).items() if b in e.exits}

        _log(f"verification: edge worker x{scale:.3f} the planning profile, agent overhead {overhead:.3f} ms per "
             f"request, {per_exit:.3f} ms per exit evaluated")
        for bw, rtt in grid:
            emus, probed = {}, None
            t0 = time.perf_counter()
            try:
                for head in bundles:
                    emus[head], eport = start_emulator(ports[head], bw, rtt, wd)
                    workers[head].call(cmd="connect", address=f"127.0.0.1:{eport}")
                    probed = probed or probe_link(eport)  # one probe per cell: the links are alike
                cell = verify_cell(search, workers, bw, rtt, probed, objective, cons,
                                   jr.evals[0].variant.staged.num_stages, thresholds_of)
            finally:
                for emu in emus.values():
                    emu.stop()
            cell["seconds"] = round(time.perf_counter() - t0, 1)
            cells.append(cell)
            _log(f"verify {bw / 1e6:g} Mbit/s RTT {rtt * 1e3:g} ms: choice {cell['choice']['head']} "
                 f"k{cell['choice']['split']} {cell['choice']['codec']} {cell['choice']['exits']} "
                 + (f"{cell['choice_measured_ms']:.2f} ms, best {cell['oracle']['measured_ms']:.2f} ms, ratio "
                    f"{cell['ratio']:.3f}" if "ratio" in cell else cell.get("unverified", "")))
    finally:
        for w in workers.values():
            w.close()
        for srv in servers.values():
            srv.stop()
        limit.close()
    return {"cells": cells, "edge_scale": round(scale, 4), "agent_overhead_ms": round(overhead, 4),
            "agent_exit_overhead_ms": round(per_exit, 4),
            "bundles": {h: str(p) for h, p in bundles.items()}}


def summarize(cells: list[dict], cert: dict, headline: float, times: dict, verified: dict | None = None) -> dict:
    measured = [c for c in (verified or {}).get("cells", []) if "ratio" in c]
    return {"cells": len(cells),
            "cells_joint_le_sequential": sum(c["joint"]["predicted_ms"] <= c["sequential"]["predicted_ms"] + 1e-9
                                             for c in cells),
            "cells_joint_10pct_better": sum(c["ratio"] <= 0.9 for c in cells),
            "min_ratio": min(c["ratio"] for c in cells),
            "verified_cells": sum(c["verified"] for c in measured),
            "verified_max_ratio": max((c["ratio"] for c in measured), default=None),
            "verified_measured_cells": len(measured),
            "verified_note": ("not measured (--verify-cells 0)" if verified is None else
                              f"measured joint choice <= {VERIFY_MARGIN}x the best measured configuration, through "
                              f"bench.linkemu, the edge worker at x{verified['edge_scale']} the planning profile"),
            "exits_splits_within_epsilon": cert[str(headline)]["within"],
            "exits_splits_within_epsilon_by_eps": {e: v["within"] for e, v in cert.items()},
            # the bar: `plan make` with all variants / today's `plan make`, as commands (see time_cli)
            "planning_time_ratio": (round(times["cli_joint_s"] / times["cli_today_s"], 3) if "cli_joint_s" in times
                                    else None),
            # the planning alone, in one warm process (make_default_plan; see plan_both): stricter
            "planning_time_ratio_in_process": round(times["joint_s"] / times["today_s"], 3), **times}


def table(cells: list[dict]) -> str:
    lines = [f"{'Mbit/s':>7} {'RTT':>4} | {'joint':<34} {'ms':>8} | {'sequential':<34} {'ms':>8} | ratio"]
    for c in cells:
        j, s = c["joint"], c["sequential"]
        fj = f"{j['head'][:14]} k{j['split']} {j['codec'][:9]} {j['exits']}"
        fs = f"{s['head'][:14]} k{s['split']} {s['codec'][:9]} {s['exits']}"
        lines.append(f"{c['bandwidth_mbps']:>7g} {c['rtt_ms']:>4g} | {fj:<34} {j['predicted_ms']:>8.2f} | "
                     f"{fs:<34} {s['predicted_ms']:>8.2f} | {c['ratio']:.3f}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    x = np.arange(len(cells))
    ax1.bar(x - 0.2, [c["sequential"]["predicted_ms"] for c in cells], 0.4, label="sequential (fp32 plan, then "
                                                                                  "compress its head)")
    ax1.bar(x + 0.2, [c["joint"]["predicted_ms"] for c in cells], 0.4, label="joint")
    ax1.set_xticks(x, [f"{c['bandwidth_mbps']:g}M/{c['rtt_ms']:g}ms" for c in cells], rotation=60, fontsize=8)
    for i, c in enumerate(cells):
        ax1.annotate(f"{c['ratio']:.2f}", (i + 0.2, c["joint"]["predicted_ms"]), ha="center", va="bottom", fontsize=7)
    ax1.set_ylim(0, 1.15 * max(c["sequential"]["predicted_ms"] for c in cells))
    ax1.set_ylabel("predicted latency (ms); joint / sequential above the bars")
    ax1.set_title("joint vs sequential planning, default model, Raspberry Pi 4 edge")
    ax1.legend(fontsize=8)
    cert = report["certification"]
    eps = list(cert)
    ax2.bar(range(len(eps)), [cert[e]["within"] for e in eps], label="within epsilon")
    ax2.bar(range(len(eps)), [cert[e]["rejected"] for e in eps], bottom=[cert[e]["within"] for e in eps],
            label="calibration rejects the system")
    ax2.axhline(95, color="k", lw=0.8, ls="--")
    ax2.set_xticks(range(len(eps)), [f"eps={e}\n{cert[e]['system']['head']} k{cert[e]['system']['split']}\n"
                                     f"exits {cert[e]['system']['exits']}" if "system" in cert[e] else f"eps={e}"
                                     for e in eps], fontsize=8)
    ax2.set_ylabel(f"of {cert[eps[0]]['splits']} random splits")
    ax2.set_title("end-to-end certificate on the chosen system")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from partitioner.cost import Link
    from partitioner.search import Constraints, Objective
    from splitinfer.energy import get_profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--png", type=Path, default=None, help="figure (default: --out with .png)")
    ap.add_argument("--variants", default="all", help="head variants: all, or names / plan compress directories")
    ap.add_argument("--device", default="raspberry-pi-4")
    ap.add_argument("--epsilon", type=float, default=0.05)
    ap.add_argument("--epsilons", default="0.01,0.02,0.05")
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--max-accuracy-drop", type=float, default=1.0)
    ap.add_argument("--bandwidth", type=float, default=10.0, help="the planned link, Mbit/s")
    ap.add_argument("--rtt", type=float, default=50.0, help="the planned link, ms")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--calibration-size", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_joint"))
    ap.add_argument("--cli-rounds", type=int, default=2, help="timed `plan make` command pairs (0: not timed)")
    ap.add_argument("--verify-cells", type=int, default=len(CELL_BANDWIDTHS) * len(CELL_RTTS),
                    help="cells verified through the link emulator (the first N of bandwidths x RTTs; 0: none)")
    ap.add_argument("--validation-limit", type=int, default=None, help="validation images to plan with (smoke "
                                                                       "tests; default: all 5,000)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    device = get_profile(args.device)
    link = Link(args.bandwidth * 1e6, args.rtt / 1e3)
    args.workdir.mkdir(parents=True, exist_ok=True)
    joint, today, times = plan_both(args.workdir, link, device, args.epsilon, args.delta, args.max_accuracy_drop,
                                    args.repeats, args.variants, args.validation_limit)
    _log(f"planned: joint {times['joint_s']} s, today's {times['today_s']} s")
    if args.cli_rounds > 0:
        times.update(time_cli(args.workdir.resolve(), args.bandwidth, args.rtt, args.device, args.epsilon, args.delta,
                              args.max_accuracy_drop, args.repeats, args.variants, args.cli_rounds))
        _log(f"plan make as commands: joint {times['cli_joint_s']} s, today's {times['cli_today_s']} s")
    jr = joint.joint
    objective = Objective()
    cons = Constraints(max_accuracy_drop=args.max_accuracy_drop, epsilon=args.epsilon)
    cells = compare_cells(jr, objective, cons)
    print(table(cells))
    from partitioner.joint import key_of
    from splitinfer.data import load_fashion_mnist

    test = load_fashion_mnist("test")
    labels = np.asarray(test.labels, dtype=np.int64)
    epsilons = sorted({float(e) for e in args.epsilons.split(",")} | {args.epsilon})
    cert, rejections, systems = {}, {}, {}
    for eps in epsilons:
        # the shipped plan's system at its own epsilon; at the others, what the planner chooses there
        chosen, rejections[str(eps)] = rejected_at(jr, link, objective, cons, eps)
        if eps == args.epsilon:
            chosen = joint.chosen
        if chosen is None:
            continue
        if key_of(chosen) not in systems:
            systems[key_of(chosen)] = system_on_test(jr, chosen, test)
        cert.update(certification(systems[key_of(chosen)], labels, [eps], args.delta, args.splits,
                                  args.calibration_size, args.seed))
        cert[str(eps)]["system"] = describe(chosen)
    _log(f"certification: {json.dumps({e: (v['within'], v['rejected']) for e, v in cert.items()})}")
    verified = None
    if args.verify_cells > 0:
        grid = [(bw, rtt) for bw in CELL_BANDWIDTHS for rtt in CELL_RTTS][: args.verify_cells]
        bundles = {"fp32": today.path, **({joint.plan.notes["head_variant"]: joint.path}
                                          if joint.plan.notes["head_variant"] != "fp32" else {})}
        verified = verify(jr, bundles, args.workdir, objective, cons, grid, args.repeats)
    report = {
        "summary": summarize(cells, cert, args.epsilon, times, verified),
        "chosen": {**describe(joint.chosen), "plan_notes": {k: v for k, v in joint.plan.notes.items()
                                                            if k.startswith(("head_variant", "rejected"))}},
        "today_chosen": describe(today.chosen),
        "cells": cells, "certification": cert, "rejected_by_epsilon": rejections, "verification": verified,
        "variants": [{"name": ev.name, "agreement_screen": round(ev.agreement, 5),
                      "weights_bytes": ev.variant.weights_bytes, "same_arch": ev.variant.same_arch,
                      "kept_splits": jr.kept_splits.get(ev.name, []), "seconds": {k: round(v, 2)
                                                                                 for k, v in ev.seconds.items()}}
                     for ev in jr.evals],
        "joint_seconds": {k: round(v, 2) for k, v in jr.seconds.items()},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "machine": os.uname().nodename, "cpus": os.cpu_count()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.png or args.out.with_suffix(".png"))
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main()
