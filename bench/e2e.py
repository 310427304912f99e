"""Benchmark: splitinfer end to end, adaptive, against edge-only, cloud-only and the best fixed split,
in every cell of bandwidth x RTT through the link emulator, plus a bandwidth-drop trace.

Setup (as ``bench.planner``): the real cloud server (``python -m cloud_server serve``, 1 torch thread, 1
worker), the link emulator as its own process (``bench.e2e_linkemu``: ``bench.linkemu``'s
``RunningEmulator`` whose rate and delay are changed at run time; one-way delay RTT/2 each way), and the real
:class:`edge_agent.runtime.EdgeRuntime` (1 torch thread) in ``bench.edge_worker``. For resnet50 the edge process
runs in a cgroup limited to a quarter of one CPU (1 ms per 4 ms): a device ~5x slower than the server. The
default model's edge is not throttled (its whole request is shorter than a quota period; see bench.planner).

Models: ``default`` (committed weights and exits; the real Fashion-MNIST test images; accuracy and timing) and
``resnet50`` (random weights, timing only; inputs are real photographs, see below).

The plan (the bundle both daemons load, with its table of operating points):

* default: ``bench.planner.plan_model`` (profiles measured here, 1 thread: the edge is this machine,
  unthrottled; latency objective; certified exits; the learned codec as a candidate);
* resnet50: first ``plan_model`` (which measures the server's profile here), then, as a user runs ``plan profile``
  on the device and ``plan make --edge-profile --server-profile --agent-overhead-ms``, the edge profile and the
  agent's per-request overhead are measured in the (throttled) edge process and the bundle is planned again
  from the two profiles (``make_model_plan``). Without this the table would be planned for an edge as fast as
  the server.

Configurations measured in every cell (same inputs for all; requests interleaved in ``rounds`` so the
configurations share the machine's drift, in a carry-over-balanced order (see williams_orders); unrecorded warm-up
requests start every configuration's chunk of a round; after ``SCREEN_ROUNDS`` rounds a baseline far off the best
is no longer measured; per-cell ratios come with bootstrap intervals over the rounds, see ratio_interval):

(a) ``splitinfer``: a fresh EdgeRuntime with ``adaptive=True`` (EdgeSettings defaults: margin 0.1, dwell 2 s,
    probe every 5 s, 32 KiB throughput probe; ``timeout_s`` 60) and the plan's exits, with the agent's idle-link
    prober beside it (``edge_agent.app``'s loop: every ``min(1 s, probe_interval_s)``, ``probe_link()`` when
    ``needs_probe()``). Warm-up per cell: ``probe_server()`` as the agent's start-up does (it connects the
    channel: a link probe on a cold channel would time the connection set-up, ~1.5 RTT, as an RTT sample), one
    ``probe_link()``, then requests until the operating point has
    stayed the same for ``stable_n`` requests and at least ``probe_interval_s + 1`` s have passed (so at least
    one periodic probe has run and the minimum dwell is over); at most 60 s. Its prober is paused while the
    other configurations run (the agent would be alone on the device); on resuming, the probe that the idle
    agent would have made meanwhile (if one is due) runs before its next requests.
(b) ``edge_only``: the whole model on the edge (``adaptive=False``), with every certified exit of the bundle
    (the exits keep accuracy: the calibration bounds the disagreement with the full model by epsilon = 1 % with
    probability 95 % for any subset of exits; the measured accuracy is reported). resnet50 has no exits.
(c) ``cloud_only``: the edge sends the input as a user would: Fashion-MNIST as a PNG of the 28x28 uint8 image,
    resnet50 as a JPEG (quality 90) of a 224x224 photograph, to the server's ``image`` codec at split 0
    (``CloudClient.infer_features(bytes, {"format": ...}, split=0, codec="image")``): the server decodes and
    normalises with the plan's input spec and runs the whole model. The edge's latency is encoding + the call;
    its energy comes from the runtime's device power model (splitinfer/energy.py) with the runtime's accounting:
    compute = CPU time of the edge's work before the call (the encoding), radio = bytes sent and network time.
    The agent's table may hold this too: since the planner knows the users' files (``--input-images``; the
    default model's plan makes PNGs itself) it scores cloud-only by sending the file (codec ``image`` at split
    0) next to the uint8 tensor; at that operating point the agent encodes the pixels as PNG/JPEG q90 like this
    baseline (``--forward-files``: it gets the file and forwards it, as its HTTP API does).
(d) ``best_fixed``: one (split, codec, exit subset) for the whole grid, a static Neurosurgeon-style deployment:
    of every configuration the planner can score (``Planner.evaluate``, the same planner and profiles that made
    the bundle's table), the one with the lowest mean predicted latency over the grid's cells; measured in
    every cell with ``adaptive=False``.

Per cell and configuration: mean, p50 and p95 latency (ms, wall time of the request in the edge process),
bytes sent per request (serialized request message, as the runtime counts them), edge energy per request
(J, the runtime's ``energy_j``: compute + radio, device power model), accuracy vs the labels (default model),
answered / degraded counts. Photographs for resnet50: scikit-image's sample photographs (astronaut, coffee,
chelsea, rocket), each cut into 10 crops (centre square, four corner squares of 3/4 side, and their mirror
images) resized to 224x224 (Pillow, Lanczos); without scikit-image, matplotlib's sample photograph
(grace_hopper.jpg) cut the same way.

Drop trace (``--drop-model``, mobilenet_v2 by default: there the choice of split matters; the default model is
edge-only in every cell): 50 Mbit/s, RTT 20 ms; splitinfer adaptive warmed up as above, then requests back to back
for 20 s, the emulator drops to 1 Mbit/s (``RunningEmulator.update``), 30 s more. Every request's start time,
latency, latency parts, operating point and the agent's link estimate are recorded. Then, still at 1 Mbit/s, every
candidate fixed configuration is measured briefly (``drop_requests``): edge-only, cloud-only and each distinct
configuration of the plan's operating-point table (in order of predicted latency; a configuration without exits is
skipped when its payload's transfer time plus the RTT, a lower bound of every request, already exceeds the best
p95 measured). The best of them in the plan's space is then **replayed** through the same timeline (20 s before the
drop, 30 s after, back to back, a fixed runtime). ``drop_trace_p95_ratio`` = p95 of splitinfer's requests starting
5 s or more after the drop / the replay's p95 over the same window; ``p95_ratio_vs_short_run`` compares with the
best candidate's brief run instead (a few seconds at another moment: p95 of 20-40 requests).

Start-up trace (the drop-trace model, before the drop trace; ``--startup-s``, default 30 s per variant): a fresh
adaptive agent at 2 Mbit/s, RTT 50 ms, serving back to back from the plan's initial operating point, started (1)
as the agent starts (``probe_server()`` only: its first link probe comes ``probe_interval_s`` later, so the first
offload comes first) and (2) with the cells' warm-up probe (one ``probe_link()`` first). Recorded: when it first
switches, its mean latency, and the link estimate after every request.

Summary: ``max_ratio_vs_best_baseline`` = max over cells of splitinfer mean / min(edge_only, cloud_only,
best_fixed) mean; ``mean_gain_vs_worse_baseline`` = mean over cells of max(edge_only, cloud_only) mean /
splitinfer mean; the acceptance bars: every cell <= 1.05, gain >= 2, drop-trace ratio <= 1.2. Diagnostics per cell:
the ratio against the best configuration within the planner's space (edge-only, best fixed: everything the
agent's table could hold; cloud-only from a JPEG/PNG is not in it), the table's entry for the cell vs the
operating point the agent settled on, and its link estimate.

Run: ``python -m bench.e2e --out FILE.json [--quick] [--models default,resnet50] [--bandwidths 0.5,2,10,50,200]
[--rtts 5,50,150] [--workdir runs/bench_e2e]``; writes FILE.json, FILE.png and prints a table. ``--quick``: the
default model only, 2 cells, few requests, a short drop trace on the default model, no cgroup (the smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.planner import ROOT, CpuLimit, EdgeWorker, _log, start_server
from splitinfer.models import EMBEDDED_MODELS

MODELS = ("default", "resnet50")
REQUESTS = {"default": 400, "resnet50": 60, "mobilenet_v2": 60, "mobilenet_v2_fmnist": 60}
# The default model's edge requests take ~1.5 ms with a long tail: the configurations run on the edge get 20x the
# requests (8,000: cheap), cloud-only (15-170 ms each) every 20th of them. With 600, the means of two identical
# configurations differed by up to 5 % (standard error of the difference ~4 %); 4,000 in 40 rounds brought that to
# ~1.5 %, still too coarse to tell a 2 % cost of adaptation in 15 cells from noise.
EDGE_FACTOR = {"default": 20}
# Configurations alternate in rounds so that slow spells of the machine (seconds long) hit them alike: the default
# model's sub-2 ms requests need many short rounds (identical configurations differed by up to 10 % with 2 rounds of
# 300 requests, and still by 5 % with 8 rounds of 500: the machine's slow spells, not the sample size).
# The order within a round follows a Williams design (williams_orders): over a cycle of rounds every configuration
# runs right after every other one equally often, so what one leaves behind (cloud-only leaves the edge's CPU idle
# for seconds) costs each of them alike. Each chunk starts with CHUNK_WARMUP unrecorded requests. The rounds are
# also the unit of the bootstrap confidence intervals (ratio_interval), so there must be enough of them.
# The default model's noise is in the rounds, not in the requests (a round's agent/baseline ratio has an SD of
# 0.08-0.18 whether a chunk holds 12 or 50 requests): 640 rounds of 12-13 requests (5 unrecorded) gave half the
# interval width of 160 rounds of 50 (20 unrecorded) on the same cells (+/-1.3 % instead of +/-2.7 %), for ~20 %
# more time (IPC per chunk). Two identical fixed runtimes in one worker agree within 0.2 % once the loaded objects
# are frozen out of the garbage collector (freeze_loaded, as the worker does); without the freeze, collections
# aliased with the round's periodic order made one of them ~1 % slower than the other, run after run.
ROUNDS = {"default": 640, "resnet50": 60, "mobilenet_v2": 60, "mobilenet_v2_fmnist": 60}
# 100-600 ms requests on the throttled edge: one request per configuration per round (the tightest pairing; the
# machine's speed drifts by tens of percent over seconds), no warm-up requests within a round (the cloud-only
# baseline keeps its channel open like the runtimes do; round -1 warms everything up).
# After SCREEN_ROUNDS rounds a baseline whose mean is above SCREEN_FACTOR x the best mean so far stops being
# measured: it can be neither the best baseline nor within reach of it (resnet50's edge-only at 2-200 Mbit/s is
# 2-4x cloud-only and costs 0.55 s a request). splitinfer and the configuration it runs are never dropped.
SCREEN_ROUNDS, SCREEN_FACTOR = 4, 1.3
BOOTSTRAP = 2000
CHUNK_WARMUP = {"default": 5}
# per candidate configuration after the drop
DROP_REQUESTS = {"default": 100, "resnet50": 20, "mobilenet_v2": 40, "mobilenet_v2_fmnist": 40}
EDGE_CPU = {"default": 1.0, "resnet50": 0.25, "mobilenet_v2": 0.25, "mobilenet_v2_fmnist": 0.25}
CONFIGS = ("splitinfer", "edge_only", "cloud_only", "best_fixed")
SAME_AS_AGENT = "agent_config"  # a fixed runtime on the configuration the agent settled on, when no baseline is
TIMEOUT_S = 60.0
CGROUP = "splitinfer_e2e_edge"  # + the pid: not bench.planner's, nor another bench.e2e's (they may run at once)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PLAN_LINK = (10e6, 0.05)  # the link the bundles are planned for (their initial operating point); as bench.planner
BAR_CELL, BAR_GAIN, BAR_DROP, BAR_COST = 1.05, 2.0, 1.2, 1.02


# ---------------------------------------------------------------------------------------------- processes

class Emulator:
    """``bench.e2e_linkemu`` as a child process: a link emulator whose rate and delay change at run time."""

    def __init__(self, target_port: int, rate_bps: float, rtt_s: float, log_path: Path):
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.e2e_linkemu", "--target",
                                      f"127.0.0.1:{target_port}", "--rate", f"{rate_bps:.0f}",
                                      "--delay-ms", f"{rtt_s / 2 * 1e3:.4f}"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"link emulator did not start (exit {self.proc.poll()}); see {log_path}")
        self.port = int(json.loads(line)["port"])

    def update(self, rate_bps: float, rtt_s: float) -> float:
        """Change the link; returns the emulator's ``time.monotonic()`` when it took the new settings."""
        self.proc.stdin.write(json.dumps({"rate_bps": rate_bps, "delay_ms": rtt_s / 2 * 1e3}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline() or "{}")
        if not out.get("ok"):
            raise RuntimeError(f"link emulator: {out.get('error', 'no answer')}")
        return float(out["t"])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Worker(EdgeWorker):
    """``bench.edge_worker`` with the benchmark's pixels as inputs (``send``/``receive`` for calls that overlap
    with the driver's own actions: the drop trace)."""

    def __init__(self, bundle: Path, pixels: Path, log_path: Path, limit: CpuLimit,  # noqa: D107
                 file_format: str = "auto"):
        self._start(["--bundle", str(bundle), "--pixels", str(pixels), "--log-level", "info", "--file-format",
                     file_format], log_path, limit)

    def close(self) -> None:
        super().close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------- inputs

def photo_pixels(size: int = 224) -> tuple[np.ndarray, str]:
    """uint8 ``[N, size, size, 3]`` crops of real photographs, and where they came from."""
    from PIL import Image

    sources: list[tuple[str, np.ndarray]] = []
    try:
        import skimage.data

        sources = [(name, getattr(skimage.data, name)()) for name in PHOTOS]
        origin = "scikit-image sample photographs: " + ", ".join(PHOTOS)
    except Exception:  # scikit-image missing: matplotlib's sample photograph
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            sources = [("grace_hopper", np.asarray(Image.open(fh).convert("RGB")))]
        origin = "matplotlib sample photograph grace_hopper.jpg (scikit-image not installed)"
    out = []
    for _, img in sources:
        h, w = img.shape[:2]
        side = min(h, w)
        small = int(side * 0.75)
        boxes = [((w - side) // 2, (h - side) // 2, side), (0, 0, small), (w - small, 0, small),
                 (0, h - small, small), (w - small, h - small, small)]
        for x, y, s in boxes:
            crop = Image.fromarray(np.ascontiguousarray(img[y : y + s, x : x + s, :3])).resize(
                (size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(crop.convert("RGB"), dtype=np.uint8)
            out += [arr, np.ascontiguousarray(arr[:, ::-1])]
    return np.stack(out), origin + f"; {len(out)} crops (centre square, 4 corner squares of 3/4 side, mirrored) " \
                                   f"resized to {size}x{size} (Lanczos)"


# ---------------------------------------------------------------------------------------------- planning

def plan_bundle(name: str, workdir: Path, repeats: int, quick: bool):
    """The first plan (profiles measured here): bench.planner's plan_model, or a lighter one for --quick."""
    if name in EMBEDDED_MODELS and quick:
        from partitioner.cost import Link
        from partitioner.make import make_default_plan

        return make_default_plan(workdir / name / "bundle", Link(*PLAN_LINK), repeats=repeats,
                                 validation_limit=2000, model=name)
    from bench.planner import plan_model

    return plan_model(name, workdir, repeats).result


def replan_for_device(name: str, first, edge_profile, workdir: Path, repeats: int):
    """``plan make --edge-profile --server-profile --agent-overhead-ms``: the bundle planned from the profile
    measured on the (throttled) edge and the server's profile measured here."""
    from partitioner.cost import Link
    from partitioner.make import PlanOptions, make_model_plan
    from partitioner.target import load_target
    from splitinfer.imaging import ImageCodec

    server = first.server_profile or first.profile
    if name in EMBEDDED_MODELS:  # exits, certified thresholds and learned codecs, planned for the device (its
        # cloud-only candidate sends each validation image as PNG or JPEG q90, whichever is smaller)
        from partitioner.make import make_default_plan

        return make_default_plan(workdir / name / "bundle_device", Link(*PLAN_LINK), repeats=repeats,
                                 edge_profile=edge_profile, server_profile=server, model=name)
    target = load_target(name)
    # The photos as users send them (JPEG q90, the cloud-only baseline's files): with them the table may
    # hold cloud-only by sending the file (codec ``image`` at split 0), not only the uint8 tensor.
    jpeg = ImageCodec(target.input_spec, fmt="jpeg", quality=90)
    files = tuple(jpeg.encode(p)[0] for p in photo_pixels(int(target.input_spec.shape[-1]))[0])
    return make_model_plan(workdir / name / "bundle_device", target,
                           PlanOptions(link=Link(*PLAN_LINK), repeats=repeats, input_images=files),
                           edge_profile=edge_profile, server_profile=server)


def grid_links(bandwidths: list[float], rtts: list[float]):
    from partitioner.cost import Link

    return [(bw, rtt, Link(bw, rtt)) for bw in bandwidths for rtt in rtts]


def best_fixed_config(planner, bandwidths: list[float], rtts: list[float]) -> dict:
    """The (split, codec, exits) with the lowest mean predicted latency over the grid (Planner.evaluate)."""
    sums: dict[tuple, list[float]] = {}
    for _, _, link in grid_links(bandwidths, rtts):
        for e in planner.evaluate(link):
            sums.setdefault((e.split, e.codec, tuple(e.exits)), []).append(e.expected_latency_ms)
    n_cells = len(bandwidths) * len(rtts)
    means = {k: statistics.fmean(v) for k, v in sums.items() if len(v) == n_cells and all(map(math.isfinite, v))}
    ranked = sorted(means, key=lambda k: (means[k], k[0]))
    k = ranked[0]
    return {"split": k[0], "codec": k[1], "exits": list(k[2]), "predicted_grid_mean_ms": round(means[k], 3),
            "runners_up": [{"split": r[0], "codec": r[1], "exits": list(r[2]),
                            "predicted_grid_mean_ms": round(means[r], 3)} for r in ranked[1:6]],
            "definition": "one (split, codec, exit subset) for the whole grid: of every configuration the planner "
                          "scores (Planner.evaluate over the same profiles that made the bundle's table), the one "
                          "with the lowest mean predicted latency over the grid's cells"}


def predicted(planner, link, split: int, codec: str, exits: list[int]) -> float | None:
    for e in planner.evaluate(link):
        if e.split == split and e.codec == codec and sorted(e.exits) == sorted(exits):
            return round(e.expected_latency_ms, 3)
    return None


def table_entry(plan, bw: float, rtt: float):
    """The plan's operating point for exactly this cell (or the nearest in log space)."""
    return min(plan.operating_points, key=lambda p: math.hypot(math.log(p.bandwidth_bps / bw),
                                                                math.log(p.rtt_ms / (rtt * 1e3))))


# ---------------------------------------------------------------------------------------------- statistics

def stats(records: list[dict], labels: np.ndarray | None) -> dict:
    walls = np.array([r["wall_ms"] for r in records], dtype=float)
    energy = np.array([sum(r["energy_j"].values()) for r in records], dtype=float)
    out = {"n": len(records), "answered": sum(1 for r in records if isinstance(r.get("label"), int)),
           "degraded": sum(1 for r in records if r["degraded"]),
           "mean_ms": round(float(walls.mean()), 3), "p50_ms": round(float(np.percentile(walls, 50)), 3),
           "p95_ms": round(float(np.percentile(walls, 95)), 3),
           "bytes_per_request": round(float(np.mean([r["bytes_sent"] for r in records])), 1),
           "energy_j_per_request": round(float(energy.mean()), 6),
           "energy_compute_j": round(float(np.mean([r["energy_j"].get("compute", 0.0) for r in records])), 6),
           "energy_radio_j": round(float(np.mean([r["energy_j"].get("radio", 0.0) for r in records])), 6),
           "offload_fraction": round(float(np.mean([r["outcome"] == "cloud" for r in records])), 4),
           "exit_fraction": round(float(np.mean([r["outcome"] == "edge_exit" and r["decided_by"] != r["op"][0]
                                                 for r in records])), 4)}
    keys = sorted({k for r in records for k in r.get("latency_ms", {})})
    out["parts_mean_ms"] = {k: round(float(np.mean([r["latency_ms"].get(k, 0.0) for r in records])), 3) for k in keys}
    ops: dict[str, int] = {}
    for r in records:
        key = f"{r['op'][0]}/{r['op'][1]}/{','.join(map(str, r['op'][2]))}"
        ops[key] = ops.get(key, 0) + 1
    out["ops"] = ops
    if labels is not None:
        out["accuracy"] = round(float(np.mean([r["label"] == int(labels[r["index"]]) for r in records])), 4)
    return out


# ---------------------------------------------------------------------------------------------- design, intervals

def williams_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` configurations over a cycle of rounds in which each runs right after every other equally
    often (a Williams design: ``n`` rows for even ``n``, ``2n`` for odd ``n``; each configuration also takes each
    position equally often)."""
    if n < 1:
        raise ValueError("no configurations")
    first = [0]
    lo, hi = 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(c + i) % n for c in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def same_config(a: tuple, b: tuple, n_stages: int) -> bool:
    """Whether two (split, codec, exits) run the same: edge-only ignores the codec; exits None is every exit."""
    if int(a[0]) != int(b[0]):
        return False
    if a[2] is not None and b[2] is not None and sorted(a[2]) != sorted(b[2]):
        return False
    return int(a[0]) == n_stages or a[1] is None or b[1] is None or a[1] == b[1]


def screen(records: dict[str, list[dict]], active: list[str], keep: set[str]) -> dict[str, str]:
    """The configurations to stop measuring after the screening rounds (see SCREEN_FACTOR), with why."""
    means = {c: float(np.mean([r["wall_ms"] for r in records[c]])) for c in active if records[c]}
    if not means:
        return {}
    best = min(means.values())
    return {c: f"mean {m:.3f} ms > {SCREEN_FACTOR} x the best {best:.3f} ms after {SCREEN_ROUNDS} rounds"
            for c, m in means.items() if c not in keep and m > SCREEN_FACTOR * best}


def round_means(records: list[dict]) -> dict[str, float]:
    """Mean latency (ms) per round, for looking at the noise behind an interval."""
    by: dict[int, list[float]] = {}
    for r in records:
        by.setdefault(r["round"], []).append(r["wall_ms"])
    return {str(k): round(float(np.mean(v)), 4) for k, v in sorted(by.items())}


def ratio_interval(num: list[dict], den: list[dict], n_boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Bootstrap interval of mean(num) / mean(den) over the rounds both were measured in (the rounds are the unit:
    a slow spell of the machine hits every configuration of a round). ``upper95``: one-sided 95 % upper bound."""
    rounds = sorted({r["round"] for r in num} & {r["round"] for r in den})
    if len(rounds) < 2:
        return {"rounds": len(rounds), "ci95": None, "upper95": None, "ratio": None}

    def sums(recs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        pos = {r: i for i, r in enumerate(rounds)}
        total, count = np.zeros(len(rounds)), np.zeros(len(rounds))
        for rec in recs:
            if rec["round"] in pos:
                total[pos[rec["round"]]] += rec["wall_ms"]
                count[pos[rec["round"]]] += 1
        return total, count

    (nt, nc), (dt, dc) = sums(num), sums(den)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(rounds), size=(n_boot, len(rounds)))
    boot = (nt[pick].sum(1) / nc[pick].sum(1)) / (dt[pick].sum(1) / dc[pick].sum(1))
    lo, hi, up = np.percentile(boot, [2.5, 97.5, 95])
    return {"rounds": len(rounds), "ratio": round(float((nt.sum() / nc.sum()) / (dt.sum() / dc.sum())), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)], "upper95": round(float(up), 4)}


# ---------------------------------------------------------------------------------------------- one cell

def adaptive_settings(args) -> dict:
    return {"adaptive": True, "timeout_s": TIMEOUT_S, "adapt_margin": args.adapt_margin,
            "adapt_min_dwell_s": args.adapt_min_dwell_s, "probe_interval_s": args.probe_interval_s,
            "probe_bytes": args.probe_bytes}


def warm_up(worker: Worker, address: str, warm_indices: list[int], args) -> dict:
    """A fresh adaptive runtime with its prober, started as the agent starts (``probe_server()``, which connects
    the channel), then one ``probe_link()``, then requests until its operating point is stable."""
    worker.call(cmd="open", name="adaptive", address=address, settings=adaptive_settings(args), prober=True)
    if not worker.call(cmd="ready", name="adaptive")["ready"]:
        raise RuntimeError(f"the server behind {address} is not ready")
    first = worker.call(cmd="probe", name="adaptive")
    wu = worker.call(cmd="warmup", name="adaptive", indices=warm_indices, min_s=args.warmup_min_s,
                     max_s=args.warmup_max_s, stable_n=args.warmup_stable_n, raw=args.forward_files)
    wu.pop("ok", None)
    wu["first_probe"] = {k: first[k] for k in ("probed", "op", "bw_bps", "rtt_s")}
    return wu


def run_cell(worker: Worker, emu: Emulator, ctx: dict, bw: float, rtt: float, cell_no: int, args) -> dict:
    name, plan, planner, n_stages = ctx["name"], ctx["plan"], ctx["planner"], ctx["n_stages"]
    bf = ctx["best_fixed"]
    t_cell = time.perf_counter()
    emu.update(bw, rtt)
    address = f"127.0.0.1:{emu.port}"
    n = ctx["requests"] * ctx["edge_factor"]
    measured = [int(i) % ctx["n_inputs"] for i in range(cell_no * n, (cell_no + 1) * n)]
    cloud_measured = set(measured[:: ctx["edge_factor"]])  # spread over the rounds
    wu = warm_up(worker, address, ctx["warm_indices"], args)
    worker.call(cmd="pause", name="adaptive", paused=True)
    worker.call(cmd="open", name="fixed", address=address, settings={"adaptive": False, "timeout_s": TIMEOUT_S})
    edge_exits = sorted(e.boundary for e in plan.exits)
    fixed_ops = {"edge_only": (n_stages, None, edge_exits), "best_fixed": (bf["split"], bf["codec"], bf["exits"])}
    configs = [c for c in CONFIGS if not (c == "best_fixed" and ctx["best_fixed_is_edge_only"])]
    agent_op = (int(wu["op"][0]), wu["op"][1], sorted(wu["op"][2]))
    if not any(same_config(agent_op, op, n_stages) for c, op in fixed_ops.items() if c in configs):
        configs.append(SAME_AS_AGENT)  # the cost of adaptation needs a baseline running the agent's configuration
        fixed_ops[SAME_AS_AGENT] = agent_op
    keep = {"splitinfer"} | {c for c, op in fixed_ops.items() if c in configs and same_config(agent_op, op, n_stages)}
    orders = williams_orders(len(configs))
    records: dict[str, list[dict]] = {c: [] for c in configs}
    active = list(configs)
    dropped: dict[str, dict] = {}
    chunks = [[int(i) for i in c] for c in np.array_split(np.array(measured), min(ctx["rounds"], len(measured)))]
    # An unrecorded first round (round -1, on the warm-up inputs): the first round of a cell ran slow for whichever
    # configuration came first (resnet50 at 50 Mbit/s: 155 ms vs 125-135 for the others, then 120-135 for all).
    warm_round = ctx["warm_indices"][: len(chunks[0])]
    for r, idx in [(-1, warm_round), *enumerate(chunks)]:
        if r == SCREEN_ROUNDS:
            dropped = screen(records, active, keep)
            active = [c for c in active if c not in dropped]
        warm = ctx["chunk_warmup"]
        for c in (configs[k] for k in orders[r % len(orders)]):
            if c not in active:
                continue
            if c == "splitinfer":
                worker.call(cmd="pause", name="adaptive", paused=False)
                out = worker.call(cmd="requests", name="adaptive", indices=idx, warmup=warm, raw=args.forward_files)
                worker.call(cmd="pause", name="adaptive", paused=True)
            elif c == "cloud_only":
                cidx = [i for i in idx if i in cloud_measured] if r >= 0 else idx[:: ctx["edge_factor"]]
                if not cidx:
                    continue
                out = worker.call(cmd="cloud", address=address, indices=cidx, fmt=ctx["image_format"], quality=90,
                                  timeout_s=TIMEOUT_S, warmup=1 if r < 0 else 0, keep_open=True)
            else:
                split, codec, exits = fixed_ops[c]
                worker.call(cmd="op", name="fixed", split=split, codec=codec, exits=exits)
                out = worker.call(cmd="requests", name="fixed", indices=idx, warmup=warm, raw=args.forward_files)
            if r < 0:
                continue
            for rec in out["records"]:
                rec["round"] = r
            records[c] += out["records"]
    status = worker.call(cmd="status", name="adaptive")
    worker.call(cmd="close", name="adaptive")
    worker.call(cmd="close", name="fixed")
    if ctx["best_fixed_is_edge_only"]:
        records["best_fixed"] = records["edge_only"]
    labels = ctx["labels"]
    configs = {c: stats(records[c], labels) for c in records}
    for c, why in dropped.items():
        configs[c]["screened_out"] = why
    si = configs["splitinfer"]["mean_ms"]
    baselines = {c: configs[c]["mean_ms"] for c in ("edge_only", "cloud_only", "best_fixed")}
    # A baseline screened out was far off the best in the screening rounds: its mean over those few rounds is not
    # a candidate for the best (a slow spell later in the cell raised the others', not its own).
    screened = set(dropped) | ({"best_fixed"} if ctx["best_fixed_is_edge_only"] and "edge_only" in dropped else set())
    candidates = [c for c in baselines if c not in screened] or list(baselines)
    best_base = min(candidates, key=baselines.get)
    worse = max(("edge_only", "cloud_only"), key=lambda c: baselines[c])
    in_space = {c: baselines[c] for c in ("edge_only", "best_fixed")}
    best_space = min([c for c in in_space if c not in screened] or list(in_space), key=in_space.get)
    entry = table_entry(plan, bw, rtt)
    from partitioner.cost import Link

    link = Link(bw, rtt)
    si_ops = configs["splitinfer"]["ops"]
    main_op = max(si_ops, key=si_ops.get)
    split, codec, exits = main_op.split("/")
    exits_l = [int(e) for e in exits.split(",") if e]
    est = status["status"]["estimates"]

    def same(key: str) -> bool:  # the same configuration (the codec does not matter for edge-only)
        k_split, k_codec, k_exits = key.split("/")
        return int(k_split) == int(split) and k_exits == exits and (int(split) == n_stages or k_codec == codec)

    same_as = [c for c in ("edge_only", "best_fixed", SAME_AS_AGENT)
               if c in configs and len(configs[c]["ops"]) == 1 and same(next(iter(configs[c]["ops"])))]
    same_as.sort(key=lambda c: c in dropped)  # one measured in every round first
    intervals = {"vs_best_baseline": ratio_interval(records["splitinfer"], records[best_base]),
                 "vs_same_config": ratio_interval(records["splitinfer"], records[same_as[0]]) if same_as else None}
    cell = {
        "model": name, "bandwidth_mbps": bw / 1e6, "rtt_ms": rtt * 1e3, "configs": configs,
        "best_baseline": best_base, "best_baseline_mean_ms": baselines[best_base],
        "ratio_vs_best_baseline": round(si / baselines[best_base], 4),
        "worse_baseline": worse, "gain_vs_worse_baseline": round(baselines[worse] / si, 4),
        "same_config_as": same_as,
        "ratio_vs_same_config": round(si / configs[same_as[0]]["mean_ms"], 4) if same_as else None,
        "ratio_intervals": intervals,
        "ratio_vs_best_baseline_upper95": intervals["vs_best_baseline"]["upper95"],
        "configs_screened_out": sorted(dropped),
        "round_means_ms": {c: round_means(recs) for c, recs in records.items() if c != "best_fixed"
                           or not ctx["best_fixed_is_edge_only"]},
        "best_in_plan_space": best_space, "ratio_vs_best_in_plan_space": round(si / in_space[best_space], 4),
        "splitinfer": {
            "warmup": wu, "main_op": {"split": int(split), "codec": codec, "exits": exits_l},
            "switches_total": (status["status"].get("adaptive") or {}).get("switches"),
            "estimate_end": {"bandwidth_mbps": None if est.get("bandwidth_bps") is None
                             else round(est["bandwidth_bps"] / 1e6, 4), "rtt_ms": None if est.get("rtt_s") is None
                             else round(est["rtt_s"] * 1e3, 3), "bandwidth_samples": est.get("bandwidth_samples"),
                             "rtt_samples": est.get("rtt_samples"), "changes": est.get("changes"),
                             "agent_overhead_ms": est.get("agent_overhead_ms")},
            "probes": status["probes"],
            "table_entry_for_cell": {"split": entry.split, "codec": entry.codec, "exits": list(entry.exits),
                                     "expected_latency_ms": round(entry.expected_latency_ms, 3)},
            "on_table_entry": (int(split), codec, sorted(exits_l)) == (entry.split, entry.codec, sorted(entry.exits)),
            "predicted_ms": predicted(planner, link, int(split), codec, exits_l),
        },
        "best_fixed_predicted_ms": predicted(planner, link, bf["split"], bf["codec"], bf["exits"]),
        "edge_only_predicted_ms": predicted(planner, link, n_stages, planner.codecs[0].name,
                                            sorted(e.boundary for e in plan.exits)),
        "seconds": round(time.perf_counter() - t_cell, 1),
    }
    return cell


# ---------------------------------------------------------------------------------------------- start-up

def startup_trace(worker: Worker, emu: Emulator, ctx: dict, args) -> dict:
    """A fresh adaptive agent on a slow link, started as built (``probe_server()`` only: the first link probe
    comes ``probe_interval_s`` later, so the first offload may come first) vs with the benchmark's warm-up probe
    (one ``probe_link()`` first): requests back to back; when does it leave the plan's initial operating point?"""
    bw, rtt = args.startup_mbps * 1e6, args.startup_rtt_ms / 1e3
    address = f"127.0.0.1:{emu.port}"
    emu.update(bw, rtt)
    entry = table_entry(ctx["plan"], bw, rtt)
    out: dict = {"model": ctx["name"], "bandwidth_mbps": args.startup_mbps, "rtt_ms": args.startup_rtt_ms,
                 "duration_s": args.startup_s, "planned_op": [ctx["plan"].split, ctx["plan"].codec.name],
                 "table_entry_for_cell": {"split": entry.split, "codec": entry.codec, "exits": list(entry.exits)}}
    for variant, probe_first in (("as_built", False), ("with_initial_probe", True)):
        start_op = worker.call(cmd="open", name="startup", address=address, settings=adaptive_settings(args),
                               prober=True)["op"]
        worker.call(cmd="ready", name="startup")
        t0 = time.monotonic()
        probe_switch = None
        if probe_first and worker.call(cmd="probe", name="startup")["op"] != start_op:
            probe_switch = time.monotonic() - t0  # the probe's estimate alone moved it
        records = worker.call(cmd="trace", name="startup", indices=list(range(ctx["n_inputs"])),
                              duration_s=args.startup_s, raw=args.forward_files)["records"]
        status = worker.call(cmd="status", name="startup")
        worker.call(cmd="close", name="startup")
        switch = next((r for r in records if r["op_after"] != start_op), None)
        first_switch = probe_switch if probe_switch is not None else (
            None if switch is None else switch["t"] + switch["wall_ms"] / 1e3 - t0)
        est = status["status"]["estimates"]
        out[variant] = {
            "requests": len(records), "answered": sum(isinstance(r.get("label"), int) for r in records),
            "start_op": start_op, "final_op": status["op"],
            "first_switch_s": None if first_switch is None else round(first_switch, 3),
            "switched_by_initial_probe": probe_switch is not None,
            "mean_ms": round(float(np.mean([r["wall_ms"] for r in records])), 3) if records else None,
            "estimate_end": {"bandwidth_mbps": None if est.get("bandwidth_bps") is None
                             else round(est["bandwidth_bps"] / 1e6, 4),
                             "rtt_ms": None if est.get("rtt_s") is None else round(est["rtt_s"] * 1e3, 3),
                             "bandwidth_samples": est.get("bandwidth_samples"), "rtt_samples": est.get("rtt_samples"),
                             "changes": est.get("changes")},
            "probes": status["probes"],
            "timeline": [{"t_s": round(r["t"] - t0, 3), "wall_ms": round(r["wall_ms"], 2), "split": r["op"][0],
                          "bw_estimate_mbps": None if r["bw_bps"] is None else round(r["bw_bps"] / 1e6, 4),
                          "rtt_estimate_ms": None if r["rtt_s"] is None else round(r["rtt_s"] * 1e3, 3)}
                         for r in records],
        }
    return out


# ---------------------------------------------------------------------------------------------- drop trace

def drop_trace(worker: Worker, emu: Emulator, ctx: dict, args) -> dict:
    """splitinfer through a bandwidth drop, then every candidate fixed configuration at the new condition."""
    from partitioner.cost import Link

    before, after, rtt = args.drop_from_mbps * 1e6, args.drop_to_mbps * 1e6, args.drop_rtt_ms / 1e3
    plan, planner, n_stages = ctx["plan"], ctx["planner"], ctx["n_stages"]
    address = f"127.0.0.1:{emu.port}"
    emu.update(before, rtt)
    wu = warm_up(worker, address, ctx["warm_indices"], args)
    trace_indices = list(range(ctx["n_inputs"]))
    worker.send(cmd="trace", name="adaptive", indices=trace_indices, duration_s=args.drop_pre_s + args.drop_post_s,
                raw=args.forward_files)
    t_send = time.monotonic()
    time.sleep(max(0.0, t_send + args.drop_pre_s - time.monotonic()))
    t_drop = emu.update(after, rtt)
    records = worker.receive()["records"]
    status = worker.call(cmd="status", name="adaptive")
    worker.call(cmd="close", name="adaptive")
    for r in records:
        r["t_rel_s"] = round(r["t"] - t_drop, 4)
    pre = [r for r in records if r["t"] + r["wall_ms"] / 1e3 < t_drop]
    post = [r for r in records if r["t"] >= t_drop + args.drop_settle_s]
    pre_op = pre[-1]["op_after"] if pre else None
    first_switch = next((r for r in records if r["t"] + r["wall_ms"] / 1e3 >= t_drop and r["op_after"] != pre_op),
                        None)

    # candidates at the new condition
    link = Link(after, rtt)
    worker.call(cmd="open", name="fixed", address=address, settings={"adaptive": False, "timeout_s": TIMEOUT_S})
    cands: dict[tuple, dict] = {}
    for p in plan.operating_points:
        cands.setdefault((p.split, p.codec, tuple(sorted(p.exits))), {"source": "operating point"})
    edge_key = (n_stages, planner.codecs[0].name, tuple(sorted(e.boundary for e in plan.exits)))
    cands[edge_key] = {"source": "edge-only"}
    ests = {(e.split, e.codec, tuple(sorted(e.exits))): e for e in planner.evaluate(link)}
    order = sorted(cands, key=lambda k: ests[k].expected_latency_ms if k in ests else math.inf)
    order = [edge_key] + [k for k in order if k != edge_key]
    n = ctx["drop_requests"]
    idx = [i % ctx["n_inputs"] for i in range(n)]  # fewer inputs than requests: cycle
    results: list[dict] = []
    best_p95 = math.inf
    out = worker.call(cmd="cloud", address=address, indices=idx, fmt=ctx["image_format"], quality=90,
                      timeout_s=TIMEOUT_S, warmup=1)
    s = stats(out["records"], ctx["labels"])
    results.append({"config": "cloud_only", "format": ctx["image_format"], **s})
    best_p95 = min(best_p95, s["p95_ms"])
    for k in order:
        split, codec, exits = k
        e = ests.get(k)
        entry = {"config": "edge_only" if k == edge_key else "fixed", "split": split, "codec": codec,
                 "exits": list(exits), "source": cands[k]["source"],
                 "predicted_ms": None if e is None else round(e.expected_latency_ms, 3)}
        if split < n_stages and not exits and e is not None:
            bound = (e.bytes_per_offload * 8 / after + rtt) * 1e3
            if bound >= best_p95:
                results.append({**entry, "skipped": f"lower bound {bound:.1f} ms >= best p95 {best_p95:.1f} ms"})
                continue
        worker.call(cmd="op", name="fixed", split=split, codec=codec, exits=list(exits))
        out = worker.call(cmd="requests", name="fixed", indices=idx, warmup=1, raw=args.forward_files)
        s = stats(out["records"], ctx["labels"])
        results.append({**entry, **s})
        best_p95 = min(best_p95, s["p95_ms"])
    measured = [r for r in results if "p95_ms" in r]
    best = min(measured, key=lambda r: r["p95_ms"])
    best_space = min((r for r in measured if r["config"] != "cloud_only"), key=lambda r: r["p95_ms"])
    replay = replay_through_drop(worker, emu, ctx, args, best_space)
    worker.call(cmd="close", name="fixed")
    post_w = np.array([r["wall_ms"] for r in post], dtype=float)
    pre_w = np.array([r["wall_ms"] for r in pre], dtype=float)
    p95_post = float(np.percentile(post_w, 95)) if post_w.size else math.nan
    slim = [{"t_rel_s": r["t_rel_s"], "wall_ms": r["wall_ms"], "split": r["op"][0], "codec": r["op"][1],
             "split_after": r["op_after"][0], "bytes_sent": r["bytes_sent"], "degraded": r["degraded"],
             "answered": isinstance(r.get("label"), int),
             "bw_estimate_mbps": None if r["bw_bps"] is None else round(r["bw_bps"] / 1e6, 4),
             "rtt_estimate_ms": None if r["rtt_s"] is None else round(r["rtt_s"] * 1e3, 3),
             "parts_ms": {k: round(v, 3) for k, v in r.get("latency_ms", {}).items() if k != "total"}}
            for r in records]
    return {
        "model": ctx["name"], "from_mbps": args.drop_from_mbps, "to_mbps": args.drop_to_mbps,
        "rtt_ms": args.drop_rtt_ms, "before_s": args.drop_pre_s, "after_s": args.drop_post_s,
        "settle_s": args.drop_settle_s, "warmup": wu,
        "requests": len(records), "answered": sum(1 for r in slim if r["answered"]),
        "degraded": sum(1 for r in slim if r["degraded"]),
        "before": {"n": int(pre_w.size), "mean_ms": round(float(pre_w.mean()), 3) if pre_w.size else None,
                   "p95_ms": round(float(np.percentile(pre_w, 95)), 3) if pre_w.size else None, "op": pre_op},
        "after": {"n": int(post_w.size), "mean_ms": round(float(post_w.mean()), 3) if post_w.size else None,
                  "p95_ms": round(p95_post, 3), "ops": stats(post, ctx["labels"])["ops"] if post else {}},
        "first_switch_after_drop_s": None if first_switch is None
        else round(first_switch["t"] + first_switch["wall_ms"] / 1e3 - t_drop, 3),
        "first_switch_to": None if first_switch is None else first_switch["op_after"],
        "switches_total": (status["status"].get("adaptive") or {}).get("switches"),
        "probes": status["probes"],
        "candidates_at_new_condition": results,
        "best_fixed": {k: best[k] for k in ("config", "split", "codec", "exits", "p95_ms", "mean_ms") if k in best},
        "best_fixed_in_plan_space": {k: best_space[k] for k in ("config", "split", "codec", "exits", "p95_ms",
                                                                 "mean_ms") if k in best_space},
        "p95_ratio_vs_short_run": round(p95_post / best["p95_ms"], 4),
        "p95_ratio_vs_best_in_plan_space": round(p95_post / best_space["p95_ms"], 4),
        "replay": replay,
        "p95_ratio": round(p95_post / replay["after"]["p95_ms"], 4),
        "p95_ratio_definition": "p95 of splitinfer's requests from settle_s after the drop / the p95 over the same "
                                "window of the best fixed candidate of the plan's space (by its short run at the new "
                                "condition) run through the same drop, back to back for as long (replay); "
                                "p95_ratio_vs_short_run: against the best candidate's short run (drop_requests "
                                "requests measured after the trace, cloud-only included)",
        "trace": slim,
    }


def replay_through_drop(worker: Worker, emu: Emulator, ctx: dict, args, best: dict) -> dict:
    """``best`` (a fixed configuration of the plan's space) run through the same timeline as the agent's drop
    trace: back to back from ``drop_pre_s`` before the drop to ``drop_post_s`` after it, its p95 over the same
    window. The short runs of the candidates (a few seconds each, after the trace) and the agent's 25 s window
    see different spells of the machine; this one sees the same procedure."""
    before, after, rtt = args.drop_from_mbps * 1e6, args.drop_to_mbps * 1e6, args.drop_rtt_ms / 1e3
    split, codec, exits = best["split"], best["codec"], list(best["exits"])
    emu.update(before, rtt)
    worker.call(cmd="op", name="fixed", split=split, codec=codec, exits=exits)
    warm = ctx["warm_indices"][:5]
    worker.call(cmd="requests", name="fixed", indices=warm, warmup=0, raw=args.forward_files)
    worker.send(cmd="trace", name="fixed", indices=list(range(ctx["n_inputs"])),
                duration_s=args.drop_pre_s + args.drop_post_s, raw=args.forward_files)
    t_send = time.monotonic()
    time.sleep(max(0.0, t_send + args.drop_pre_s - time.monotonic()))
    t_drop = emu.update(after, rtt)
    records = worker.receive()["records"]
    post = np.array([r["wall_ms"] for r in records if r["t"] >= t_drop + args.drop_settle_s], dtype=float)
    return {"config": best["config"], "split": split, "codec": codec, "exits": exits, "requests": len(records),
            "answered": sum(isinstance(r.get("label"), int) for r in records),
            "after": {"n": int(post.size), "mean_ms": round(float(post.mean()), 3) if post.size else None,
                      "p95_ms": round(float(np.percentile(post, 95)), 3) if post.size else math.inf}}


# ---------------------------------------------------------------------------------------------- one model

def run_model(name: str, args, bandwidths: list[float], rtts: list[float], workdir: Path, limit: CpuLimit,
              with_trace: bool) -> tuple[list[dict], dict, dict | None]:
    from partitioner.profile import Profile
    from splitinfer.data import load_fashion_mnist, render

    wd = workdir / name
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    first = plan_bundle(name, workdir, args.repeats, args.quick)
    _log(f"{name}: first plan in {time.perf_counter() - t0:.1f} s")
    if name in EMBEDDED_MODELS:
        test = load_fashion_mnist("test")
        side = int(first.plan.input.shape[-1])
        pixels, labels = render(np.asarray(test.images, dtype=np.uint8), side), np.asarray(test.labels)
        origin = f"Fashion-MNIST test set (splitinfer.data), rendered at {side}x{side}"
        image_format = "png" if name == "default" else "smaller"
    else:
        pixels, origin = photo_pixels(int(first.plan.input.shape[-1]))
        labels, image_format = None, "jpeg"
    pixel_path = wd / "pixels.npy"
    np.save(pixel_path, pixels)
    info: dict = {"inputs": origin, "n_inputs": int(len(pixels)), "cloud_only_format": image_format}
    worker = Worker(first.path, pixel_path, wd / "edge.log", limit,
                    "smaller" if image_format == "smaller" else "auto")
    server = emu = None
    cells: list[dict] = []
    trace = None
    try:
        edge_prof = Profile.from_dict(worker.call(cmd="profile", repeats=args.repeats)["profile"])
        # 30 requests for every model: with 8, four repeats in one throttled worker gave -0.2..2.95 ms (25 % share)
        # and 2.9..7.6 ms (12.5 %) on mobilenet_v2_fmnist; with 30, 2.8..3.7 and 3.8..5.5 ms
        overhead = worker.call(cmd="overhead", n=30)["overhead_ms"]
        edge_prof.request_overhead_ms = max(0.0, overhead)
        server_prof = first.server_profile or first.profile
        if limit.path is not None:  # the table must be planned for this (slower) edge
            result = replan_for_device(name, first, edge_prof, workdir, args.repeats)
            worker.call(cmd="load", bundle=str(result.path))
            info["plan"] = "re-planned from the edge profile measured in the throttled edge process (with the " \
                           "agent's overhead) and the server profile measured here"
        else:
            result = first
            info["plan"] = "bench.planner.plan_model: profiles measured here (the unthrottled edge)"
        plan, planner = result.plan, result.planner
        info["plan_result"] = result  # for callers that model further (bench.split_pays); popped before output
        n_stages = plan.boundaries[-1].index
        bf = best_fixed_config(planner, bandwidths, rtts) if bandwidths and rtts else None
        ops = sorted({(p.split, p.codec, tuple(p.exits)) for p in plan.operating_points})
        info.update({
            "edge_total_ms": round(sum(edge_prof.stage_ms), 3), "server_total_ms": round(sum(server_prof.stage_ms), 3),
            "edge_slowdown_measured": round(sum(edge_prof.stage_ms) / max(1e-9, sum(server_prof.stage_ms)), 3),
            "agent_overhead_ms": round(overhead, 4), "edge_cpu_share": limit.fraction, "num_stages": n_stages,
            "bundle": str(result.path), "planned_split": plan.split, "planned_codec": plan.codec.name,
            "exits": {str(e.boundary): (e.threshold if math.isfinite(e.threshold) else None) for e in plan.exits},
            "operating_point_configs": [{"split": s, "codec": c, "exits": list(x)} for s, c, x in ops],
            "operating_points_in_grid": [{"bandwidth_mbps": p.bandwidth_bps / 1e6, "rtt_ms": p.rtt_ms,
                                          "split": p.split, "codec": p.codec, "exits": list(p.exits),
                                          "expected_latency_ms": round(p.expected_latency_ms, 3)}
                                         for p in plan.operating_points
                                         if any(abs(p.bandwidth_bps - b) < 1 for b in bandwidths)
                                         and any(abs(p.rtt_ms - r * 1e3) < 1e-6 for r in rtts)],
            "best_fixed": bf,
        })
        _log(f"{name}: edge {info['edge_total_ms']} ms (x{info['edge_slowdown_measured']} the server's), agent "
             f"overhead {overhead:.3f} ms; table configs {ops}; best fixed "
             + ("- (no cells)" if bf is None else f"{bf['split']} {bf['codec']} {bf['exits']} "
                                                  f"({bf['predicted_grid_mean_ms']} ms predicted over the grid)"))
        server, port = start_server(result.path, wd)
        emu = Emulator(port, (bandwidths or [args.drop_from_mbps * 1e6])[0], (rtts or [args.drop_rtt_ms / 1e3])[0],
                       wd / "emulator.log")
        n_req = args.requests or REQUESTS[name]
        warm_start = 9000 if name in EMBEDDED_MODELS else 0  # cells measure images 0..8999
        ctx = {"name": name, "plan": plan, "planner": planner, "n_stages": n_stages, "best_fixed": bf,
               "requests": n_req, "rounds": args.rounds or ROUNDS[name], "n_inputs": len(pixels),
               "chunk_warmup": args.chunk_warmup if args.chunk_warmup is not None else CHUNK_WARMUP.get(name, 0),
               "warm_indices": [(warm_start + i) % len(pixels) for i in range(min(len(pixels), 1000))],
               "edge_factor": 1 if args.requests else EDGE_FACTOR.get(name, 1),
               "labels": labels, "image_format": image_format,
               "drop_requests": args.drop_requests or DROP_REQUESTS[name]}
        edge_exits = sorted(e.boundary for e in plan.exits)
        ctx["best_fixed_is_edge_only"] = bf is not None and bf["split"] == n_stages \
            and sorted(bf["exits"]) == edge_exits
        info["best_fixed_is_edge_only"] = ctx["best_fixed_is_edge_only"]
        cell_no = 0
        for bw in bandwidths:
            for rtt in rtts:
                cell = run_cell(worker, emu, ctx, bw, rtt, cell_no, args)
                cell_no += 1
                cells.append(cell)
                c, si = cell["configs"], cell["splitinfer"]
                _log(f"{name} {bw / 1e6:g} Mbit/s RTT {rtt * 1e3:g} ms: splitinfer {c['splitinfer']['mean_ms']:.1f} "
                     f"(op {si['main_op']['split']}, table {si['table_entry_for_cell']['split']}) "
                     f"edge {c['edge_only']['mean_ms']:.1f} cloud {c['cloud_only']['mean_ms']:.1f} "
                     f"fixed {c['best_fixed']['mean_ms']:.1f} ms; ratio {cell['ratio_vs_best_baseline']:.3f} "
                     f"({cell['best_baseline']}), gain {cell['gain_vs_worse_baseline']:.2f}; {cell['seconds']} s")
        if with_trace and args.startup_s > 0:
            t1 = time.perf_counter()
            startup = startup_trace(worker, emu, ctx, args)
            startup["seconds"] = round(time.perf_counter() - t1, 1)
            info["startup_trace"] = startup
            _log(f"{name} start-up at {args.startup_mbps:g} Mbit/s, RTT {args.startup_rtt_ms:g} ms: as built "
                 f"{startup['as_built']['start_op']} -> {startup['as_built']['final_op']}, first switch "
                 f"{startup['as_built']['first_switch_s']} s, mean {startup['as_built']['mean_ms']} ms; with an "
                 f"initial probe: first switch {startup['with_initial_probe']['first_switch_s']} s, mean "
                 f"{startup['with_initial_probe']['mean_ms']} ms")
        if with_trace:
            t1 = time.perf_counter()
            try:
                trace = drop_trace(worker, emu, ctx, args)
            except Exception as exc:  # noqa: BLE001 - keep the cells measured so far; the summary says it failed
                _log(f"{name} drop trace FAILED: {type(exc).__name__}: {exc}")
                info["drop_trace_error"] = f"{type(exc).__name__}: {exc}"
                return cells, info, None
            trace["seconds"] = round(time.perf_counter() - t1, 1)
            _log(f"{name} drop trace: p95 after {trace['after']['p95_ms']:.1f} ms vs best fixed "
                 f"{trace['best_fixed']['p95_ms']:.1f} ms ({trace['best_fixed']['config']} "
                 f"{trace['best_fixed'].get('split', '')}): ratio {trace['p95_ratio']:.3f}; first switch "
                 f"{trace['first_switch_after_drop_s']} s after the drop")
    finally:
        worker.close()
        if emu is not None:
            emu.close()
        if server is not None:
            server.stop()
    return cells, info, trace


# ---------------------------------------------------------------------------------------------- summary, output

def summarize(cells: list[dict], trace: dict | None) -> dict:
    ratios = [c["ratio_vs_best_baseline"] for c in cells]
    gains = [c["gain_vs_worse_baseline"] for c in cells]
    space = [c["ratio_vs_best_in_plan_space"] for c in cells]
    out = {
        "cells": len(cells),
        "max_ratio_vs_best_baseline": round(max(ratios), 4),
        "max_ratio_definition": "max over cells of splitinfer mean latency / min(edge_only, cloud_only, best_fixed) "
                                "mean latency",
        "cells_within_5pct_of_best_baseline": int(sum(r <= BAR_CELL for r in ratios)),
        "median_ratio_vs_best_baseline": round(float(np.median(ratios)), 4),
        "mean_gain_vs_worse_baseline": round(float(np.mean(gains)), 4),
        "mean_gain_definition": "mean over cells of max(edge_only mean, cloud_only mean) / splitinfer mean "
                                "(arithmetic mean of the per-cell ratios)",
        "geomean_gain_vs_worse_baseline": round(float(np.exp(np.mean(np.log(gains)))), 4),
        "max_ratio_vs_best_in_plan_space": round(max(space), 4),
        "max_ratio_vs_best_in_plan_space_definition": "splitinfer / min(edge_only, best_fixed): the baselines "
                                                      "the agent's operating-point table could hold",
        "drop_trace_p95_ratio": None if trace is None else trace["p95_ratio"],
        "drop_trace_p95_ratio_vs_best_in_plan_space": None if trace is None
        else trace["p95_ratio_vs_best_in_plan_space"],
        "all_requests_answered": all(s["answered"] == s["n"] for c in cells for s in c["configs"].values())
        and (trace is None or trace["answered"] == trace["requests"]),
        "degraded_requests": sum(s["degraded"] for c in cells for s in c["configs"].values())
        + (0 if trace is None else trace["degraded"]),
    }
    same = [c for c in cells if c["ratio_vs_same_config"] is not None]

    def group(cs: list[dict]) -> dict:
        r = [c["ratio_vs_same_config"] for c in cs]
        return {"cells": len(r), "mean": round(float(np.mean(r)), 4) if r else None,
                "max": round(max(r), 4) if r else None}

    has_bw = [c for c in same if c["splitinfer"]["estimate_end"]["bandwidth_samples"]]
    offloading = [c for c in cells if c["configs"]["splitinfer"]["bytes_per_request"] > 0]
    out["diagnostics"] = {
        "cells_best_baseline": {b: sum(c["best_baseline"] == b for c in cells)
                                for b in ("edge_only", "cloud_only", "best_fixed")},
        "cells_agent_on_table_entry": sum(bool(c["splitinfer"]["on_table_entry"]) for c in cells),
        "ratio_vs_same_config": {
            "definition": "splitinfer mean / the mean of a baseline running the very configuration the agent "
                          "settled on (the cost of adaptation itself)",
            "all": group(same), "agent_had_bandwidth_estimate": group(has_bw),
            "agent_had_no_bandwidth_estimate": group([c for c in same if c not in has_bw])},
        "cells_without_bandwidth_estimate": sum(not c["splitinfer"]["estimate_end"]["bandwidth_samples"]
                                                for c in cells),
        "cloud_only_bytes_over_splitinfer_bytes_when_offloading": None if not offloading else round(float(np.mean(
            [c["configs"]["cloud_only"]["bytes_per_request"] / c["configs"]["splitinfer"]["bytes_per_request"]
             for c in offloading])), 4),
    }
    uppers = [c["ratio_vs_best_baseline_upper95"] for c in cells if c.get("ratio_vs_best_baseline_upper95")]
    out["max_ratio_upper95"] = round(max(uppers), 4) if uppers else None
    out["max_ratio_upper95_definition"] = "max over cells of the one-sided 95 % upper bound of splitinfer mean / " \
                                          "best baseline mean (bootstrap over the cell's rounds)"
    costs = [c["ratio_vs_same_config"] for c in same]
    cost_up = [c["ratio_intervals"]["vs_same_config"]["upper95"] for c in same
               if (c.get("ratio_intervals") or {}).get("vs_same_config", {}).get("upper95") is not None]
    out["max_adaptation_cost"] = round(max(costs), 4) if costs else None
    out["max_adaptation_cost_definition"] = "max over cells of splitinfer mean / the mean of a fixed runtime " \
                                            "running the configuration the agent settled on (same rounds)"
    out["max_adaptation_cost_upper95"] = round(max(cost_up), 4) if cost_up else None
    out["cells_with_adaptation_cost"] = len(costs)
    out["cells_adaptation_cost_le_1.02"] = int(sum(c <= BAR_COST for c in costs))
    out["bars"] = {"every_cell_ratio_le_1.05": out["max_ratio_vs_best_baseline"] <= BAR_CELL,
                   "adaptation_cost_le_1.02_in_every_cell": bool(costs) and len(costs) == len(cells)
                   and max(costs) <= BAR_COST,
                   "mean_gain_ge_2": out["mean_gain_vs_worse_baseline"] >= BAR_GAIN,
                   "drop_trace_p95_ratio_le_1.2": None if trace is None else trace["p95_ratio"] <= BAR_DROP}
    return out


def table(cells: list[dict]) -> str:
    head = (f"{'model':>9} {'Mbit/s':>6} {'RTT':>4} {'op':>9} {'table':>5} {'splitinfer':>10} {'edge-only':>9} "
            f"{'cloud-only':>10} {'fixed':>8} {'ratio':>6} {'gain':>6} {'best':>10} {'si B/req':>9} {'si mJ':>7} "
            f"{'acc si/eo/co/fx':>19}")
    lines = [head]
    for c in cells:
        g = c["configs"]
        op = c["splitinfer"]["main_op"]
        acc = "/".join(f"{g[k]['accuracy']:.3f}" for k in CONFIGS) if "accuracy" in g["splitinfer"] else ""
        entry = c["splitinfer"]["table_entry_for_cell"]["split"]
        lines.append(f"{c['model']:>9} {c['bandwidth_mbps']:>6g} {c['rtt_ms']:>4g} "
                     f"{str(op['split']) + ' ' + op['codec'][:4]:>9} {entry:>5} "
                     f"{g['splitinfer']['mean_ms']:>10.2f} {g['edge_only']['mean_ms']:>9.2f} "
                     f"{g['cloud_only']['mean_ms']:>10.2f} {g['best_fixed']['mean_ms']:>8.2f} "
                     f"{c['ratio_vs_best_baseline']:>6.3f} {c['gain_vs_worse_baseline']:>6.2f} "
                     f"{c['best_baseline']:>10} {g['splitinfer']['bytes_per_request']:>9.0f} "
                     f"{g['splitinfer']['energy_j_per_request'] * 1e3:>7.2f} {acc:>19}")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in out["cells"]))
    trace = out.get("drop_trace")
    startup = out.get("startup_trace")
    rows = len(models) + (1 if trace else 0) + (1 if startup else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(13, 4.2 * rows), squeeze=False)
    colors = {"splitinfer": "tab:red", "edge_only": "tab:blue", "cloud_only": "tab:green", "best_fixed": "tab:gray"}
    for ax, m in zip(axes[:, 0], models, strict=False):
        cells = [c for c in out["cells"] if c["model"] == m]
        x = np.arange(len(cells))
        w = 0.2
        for j, cfg in enumerate(CONFIGS):
            means = [c["configs"][cfg]["mean_ms"] for c in cells]
            p95 = [c["configs"][cfg]["p95_ms"] for c in cells]
            ax.bar(x + (j - 1.5) * w, means, w, color=colors[cfg], label=cfg.replace("_", "-"))
            ax.scatter(x + (j - 1.5) * w, p95, marker="_", color="k", s=40, zorder=3,
                       label="p95" if j == len(CONFIGS) - 1 else None)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{c['bandwidth_mbps']:g} Mbit/s\n{c['rtt_ms']:g} ms" for c in cells], fontsize=8)
        ax.set_ylabel("latency per request (ms, log)")
        ax.set_xlabel("cell: bandwidth (Mbit/s) / RTT (ms)")
        ax.set_title(f"{m}: mean latency per configuration (bars), p95 (black ticks)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3, which="both")
    if trace:
        ax = axes[-1, 0]
        t = np.array([r["t_rel_s"] for r in trace["trace"]])
        lat = np.array([r["wall_ms"] for r in trace["trace"]])
        splits = np.array([r["split"] for r in trace["trace"]])
        sc = ax.scatter(t, lat, c=splits, cmap="viridis", s=12, label="splitinfer request (colour: split)")
        fig.colorbar(sc, ax=ax, label="split in use")
        ax.axvline(0, color="k", ls="--", lw=1, label=f"drop {trace['from_mbps']:g} -> {trace['to_mbps']:g} Mbit/s")
        ax.axvline(trace["settle_s"], color="k", ls=":", lw=1, label="p95 window starts")
        bf = trace["best_fixed"]
        ax.axhline(bf["p95_ms"], color="tab:green", lw=1,
                   label=f"best fixed p95 at {trace['to_mbps']:g} Mbit/s ({bf['config']} {bf.get('split', '')})")
        bs = trace["best_fixed_in_plan_space"]
        ax.axhline(bs["p95_ms"], color="tab:blue", lw=1, ls="-.",
                   label=f"best p95 in the plan's space ({bs['config']} {bs.get('split', '')})")
        ax.axhline(trace["after"]["p95_ms"], color="tab:red", lw=1, label="splitinfer p95 after the window start")
        ax.set_yscale("log")
        ax.set_xlabel("time since the bandwidth drop (s)")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title(f"drop trace ({trace['model']}, RTT {trace['rtt_ms']:g} ms): p95 ratio {trace['p95_ratio']:.3f}")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3, which="both")
    if startup:
        ax = axes[-2 if trace else -1, 0]
        for variant, color in (("as_built", "tab:red"), ("with_initial_probe", "tab:blue")):
            tl = startup[variant]["timeline"]
            ax.plot([r["t_s"] for r in tl], [r["wall_ms"] for r in tl], ".-", color=color, lw=0.8,
                    label=f"{variant.replace('_', ' ')} (first switch {startup[variant]['first_switch_s']} s)")
        ax.set_xlabel("time since the agent started (s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"start-up ({startup['model']}, {startup['bandwidth_mbps']:g} Mbit/s, RTT "
                     f"{startup['rtt_ms']:g} ms) from the plan's initial split {startup['planned_op'][0]}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _code_version() -> dict:
    """The commit the run measured and whether the work tree differed from it (files other engineers edit)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    # porcelain lines are "XY path": not stripped, or the first line's " M" status loses its leading blank
    return {"commit": git("rev-parse", "HEAD").strip(),
            "modified": [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()
                         if len(ln) > 3]}


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The benchmark's options with their defaults resolved (``bench.split_pays`` reuses them)."""
    ap = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="smoke run: default model, 2 cells, few requests, short "
                                                          "drop trace on the default model, no cgroup")
    ap.add_argument("--models", default=None, help=f"default: {','.join(MODELS)}")
    ap.add_argument("--bandwidths", default=None, help="Mbit/s (default 0.5,2,10,50,200)")
    ap.add_argument("--rtts", default=None, help="ms (default 5,50,150)")
    ap.add_argument("--requests", type=int, default=None, help=f"measured requests per configuration and cell "
                                                                f"(default {REQUESTS})")
    ap.add_argument("--rounds", type=int, default=None, help=f"interleaving rounds per cell (default {ROUNDS})")
    ap.add_argument("--chunk-warmup", type=int, default=None, help=f"unrecorded requests at the start of each "
                                                                  f"configuration's chunk of a round (default "
                                                                  f"{CHUNK_WARMUP}, 0 for the others)")
    ap.add_argument("--repeats", type=int, default=None, help="profiling runs per stage (default 20)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_e2e"))
    ap.add_argument("--edge-cpu", type=float, default=None, help="CPU share of the edge process for every model "
                                                                  "(default per model; 1 = no cgroup)")
    ap.add_argument("--adapt-margin", type=float, default=None)
    ap.add_argument("--adapt-min-dwell-s", type=float, default=None)
    ap.add_argument("--probe-interval-s", type=float, default=None)
    ap.add_argument("--probe-bytes", type=int, default=None)
    ap.add_argument("--warmup-min-s", type=float, default=None, help="default probe_interval_s + 1")
    ap.add_argument("--warmup-max-s", type=float, default=60.0)
    ap.add_argument("--warmup-stable-n", type=int, default=None, help="default 5 (3 with --quick)")
    ap.add_argument("--drop-model", default=None, help="model of the drop trace and the start-up trace (default "
                                                        "mobilenet_v2, run for them alone when not in --models; "
                                                        "none: skip)")
    ap.add_argument("--drop-from-mbps", type=float, default=50.0)
    ap.add_argument("--drop-to-mbps", type=float, default=1.0)
    ap.add_argument("--drop-rtt-ms", type=float, default=20.0)
    ap.add_argument("--drop-pre-s", type=float, default=None, help="default 20")
    ap.add_argument("--drop-post-s", type=float, default=None, help="default 30")
    ap.add_argument("--drop-settle-s", type=float, default=None, help="default 5")
    ap.add_argument("--drop-requests", type=int, default=None)
    ap.add_argument("--startup-s", type=float, default=None, help="start-up trace length per variant, s "
                                                                  "(default 30, 2 with --quick; 0: skip)")
    ap.add_argument("--startup-mbps", type=float, default=2.0)
    ap.add_argument("--forward-files", action="store_true",
                    help="give the agent each request's file (as its HTTP API does), so that at the image operating "
                         "point it forwards the upload instead of encoding the pixels again; default off: the agent "
                         "encodes like the cloud-only baseline does")
    ap.add_argument("--startup-rtt-ms", type=float, default=50.0)
    args = ap.parse_args(argv)

    from edge_agent.settings import EdgeSettings

    defaults = EdgeSettings.model_fields
    for knob in ("adapt_margin", "adapt_min_dwell_s", "probe_interval_s", "probe_bytes"):
        if getattr(args, knob) is None:
            setattr(args, knob, defaults[knob].default)
    q = args.quick
    args.models = args.models or ("default" if q else ",".join(MODELS))
    args.bandwidths = args.bandwidths or ("10,0.5" if q else "0.5,2,10,50,200")
    args.rtts = args.rtts or ("5" if q else "5,50,150")
    if q and args.requests is None:
        args.requests = 12
    args.repeats = args.repeats or (3 if q else 20)
    args.warmup_min_s = args.warmup_min_s if args.warmup_min_s is not None else (
        1.0 if q else args.probe_interval_s + 1.0)
    args.warmup_stable_n = args.warmup_stable_n or (3 if q else 5)
    if q:
        args.warmup_max_s = min(args.warmup_max_s, 10.0)
    args.drop_model = args.drop_model or ("default" if q else "mobilenet_v2")
    args.drop_pre_s = args.drop_pre_s if args.drop_pre_s is not None else (2.0 if q else 20.0)
    args.drop_post_s = args.drop_post_s if args.drop_post_s is not None else (3.0 if q else 30.0)
    args.drop_settle_s = args.drop_settle_s if args.drop_settle_s is not None else (1.0 if q else 5.0)
    args.startup_s = args.startup_s if args.startup_s is not None else (2.0 if q else 30.0)
    if q and args.drop_requests is None:
        args.drop_requests = 10
    return args


def edge_share(args: argparse.Namespace, name: str) -> float:
    """The edge process's CPU share for ``name`` (1 with --quick: no cgroup)."""
    if args.quick:
        return 1.0
    return args.edge_cpu if args.edge_cpu is not None else EDGE_CPU.get(name, 0.25)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    q = args.quick
    from splitinfer.allocator import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: children, cgroup
    bandwidths = [float(v) * 1e6 for v in args.bandwidths.split(",")]
    rtts = [float(v) / 1e3 for v in args.rtts.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.perf_counter()
    code = _code_version()  # what was measured: read now, not when the file is written (the tree may move on)
    cells: list[dict] = []
    infos: dict[str, dict] = {}
    trace = startup = None
    for name in models + ([args.drop_model] if args.drop_model in EDGE_CPU and args.drop_model not in models
                          else []):
        limit = CpuLimit(edge_share(args, name), name=f"{CGROUP}_{os.getpid()}")
        t0 = time.perf_counter()
        try:
            grid = (bandwidths, rtts) if name in models else ([], [])  # the drop-trace model alone: no cells
            c, info, tr = run_model(name, args, *grid, args.workdir, limit, name == args.drop_model)
        finally:
            limit.close()
        info["seconds"] = round(time.perf_counter() - t0, 1)
        info.pop("plan_result", None)
        startup = info.pop("startup_trace", None) or startup
        cells += c
        infos[name] = info
        trace = tr or trace
    per_model = {m: summarize([c for c in cells if c["model"] == m], trace if trace and trace["model"] == m else None)
                 for m in infos if any(c["model"] == m for c in cells)}
    out = {
        "summary": {**summarize(cells, trace), "per_model": per_model},
        "settings": {
            "models": models, "bandwidths_mbps": [b / 1e6 for b in bandwidths], "rtts_ms": [r * 1e3 for r in rtts],
            "requests_per_config_and_cell": {m: args.requests or REQUESTS[m] for m in models},
            "requests_per_edge_config_and_cell": {m: (args.requests or REQUESTS[m])
                                                  * (1 if args.requests else EDGE_FACTOR.get(m, 1)) for m in models},
            "rounds": {m: args.rounds or ROUNDS[m] for m in models},
            "warmup_requests_per_round": {m: args.chunk_warmup if args.chunk_warmup is not None
                                          else CHUNK_WARMUP.get(m, 0) for m in models},
            "round_orders": "williams_orders(number of configurations measured in the cell), cycled over the rounds",
            "screening": f"after {SCREEN_ROUNDS} rounds, baselines above {SCREEN_FACTOR} x the best mean so far are "
                         "no longer measured (never splitinfer nor a baseline running the agent's configuration)",
            "intervals": f"bootstrap over rounds ({BOOTSTRAP} resamples) of the ratio of means; upper95 = one-sided "
                         "95 % upper bound",
            "agent_gets_files": args.forward_files,
            "edge_threads": 1, "server_threads": 1, "server_workers": 1, "timeout_s": TIMEOUT_S,
            "edge_cpu_share": {m: i["edge_cpu_share"] for m, i in infos.items()},
            "adaptive": {k: getattr(args, k) for k in ("adapt_margin", "adapt_min_dwell_s", "probe_interval_s",
                                                       "probe_bytes")},
            "splitinfer_warmup": {"first": "probe_server() (as the agent starts), then one probe_link()",
                                  "min_s": args.warmup_min_s,
                                  "stable_n": args.warmup_stable_n, "max_s": args.warmup_max_s,
                                  "rule": "requests until the operating point is unchanged for the last stable_n "
                                          "requests and min_s have passed (or max_s)"},
            "edge_only": "whole model on the edge with every certified exit of the bundle (adaptive off)",
            "cloud_only": "PNG (Fashion-MNIST 28x28 uint8) / JPEG quality 90 (resnet50, 224x224 photographs) to the "
                          "server's image codec at split 0; edge latency = encode + call; energy: device power "
                          "model, compute = encode CPU time, radio = bytes sent and network time",
            "best_fixed": "one (split, codec, exits) for the whole grid: lowest mean predicted latency over the "
                          "grid cells among every configuration Planner.evaluate scores (same planner/profiles as "
                          "the bundle's table); adaptive off",
            "energy": "EdgeResult.energy_j (compute + radio), device profile raspberry-pi-4 (EdgeSettings default), "
                      "method model",
            "bytes": "serialized request message per request (EdgeResult.bytes_sent / CloudResult.bytes_sent); "
                     "link probes of splitinfer are counted separately (cells[].splitinfer.probes)",
            "models_info": infos, "quick": q, "profile_repeats": args.repeats, "code": code,
            "machine": os.uname().nodename, "cpus": os.cpu_count(),
        },
        "cells": cells,
        "drop_trace": trace,
        "startup_trace": startup,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    png = args.out.with_suffix(".png")
    try:
        plot(out, png)
    except Exception as exc:  # the figures are in the JSON either way
        _log(f"plot failed: {exc}")
    print(table(cells))
    if trace:
        print(f"drop trace ({trace['model']}): {trace['from_mbps']:g} -> {trace['to_mbps']:g} Mbit/s, RTT "
              f"{trace['rtt_ms']:g} ms: p95 after +{trace['settle_s']:g} s {trace['after']['p95_ms']:.1f} ms; "
              f"best fixed "
              f"{trace['best_fixed']['config']} {trace['best_fixed'].get('split', '')} p95 "
              f"{trace['best_fixed']['p95_ms']:.1f} ms; ratio {trace['p95_ratio']:.3f} (vs best in plan space "
              f"{trace['p95_ratio_vs_best_in_plan_space']:.3f}); first switch "
              f"{trace['first_switch_after_drop_s']} s after the drop")
    if startup:
        a, b = startup["as_built"], startup["with_initial_probe"]
        print(f"start-up ({startup['model']}, {startup['bandwidth_mbps']:g} Mbit/s, RTT {startup['rtt_ms']:g} ms, "
              f"{startup['duration_s']:g} s): as built {a['start_op'][0]} -> {a['final_op'][0]}, first switch "
              f"{a['first_switch_s']} s, mean {a['mean_ms']} ms; with an initial link probe {b['start_op'][0]} -> "
              f"{b['final_op'][0]}, first switch {b['first_switch_s']} s, mean {b['mean_ms']} ms")
    print(json.dumps({k: v for k, v in out["summary"].items() if k != "per_model"}, indent=1))
    print(f"wrote {args.out} and {png} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
