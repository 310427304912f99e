"""Benchmark: the planner's choice against a brute-force oracle, measured end to end over the link emulator.

For each model (``default`` with its exits and learned codec; ``resnet50`` and ``mobilenet_v2`` with random
weights, for timing) and each cell of bandwidths x RTTs:

1. The planner plans the cell as a user would: from profiles measured at the start of this run (edge: this
   process, 1 torch thread; server: the same machine, 1 thread), the edge agent's own per-request overhead (its
   ``agent_overhead_ms``, measured on edge-only requests before any cell), and the link as ``plan probe``
   measures it through the emulator (RTT of ``ServerLive`` calls, throughput from growing messages; one probe
   per cell, shared by the models). For every split it also names the configuration (codec, exits) it would
   use there.
2. A real cloud server (``python -m cloud_server serve``, 1 torch thread, 1 worker) serves the model's bundle;
   the real edge runtime (:class:`edge_agent.runtime.EdgeRuntime`, 1 torch thread, in ``bench.edge_worker``)
   talks to it through the link emulator (``python -m bench.linkemu``, a separate process: the rate each
   way, one-way delay RTT/2). For resnet50 and mobilenet_v2 the edge process runs in a cgroup limited to a
   quarter of one CPU (a CFS quota of 1 ms per 4 ms period): a device ~4-5x slower than the server, as edge
   devices are (with an edge as fast as the server, edge-only would win every cell). The default model's edge
   is not throttled (see EDGE_CPU). The edge profile the planner uses is measured inside that cgroup
   ("measured on the device").
3. Every split is measured, the planner's choice first and edge-only second, the rest by predicted latency:
   the mean end-to-end latency of ``--requests`` requests (after warm-up). A split is skipped when a lower bound
   of its mean latency already exceeds the best mean measured in the cell: the offloaded fraction ``q`` of
   requests each pays at least the uplink transfer (payload / bandwidth) and the emulated RTT, so its mean is
   at least ``q * (transfer + RTT)``.
4. The first pass measures ``SCREEN`` requests per split (after one warm-up request at the new operating
   point). Configurations within 15 % of the cell's best first-pass mean, and the choice, are then measured
   with ``REQUESTS`` more and their samples pooled, so the oracle (the measured best) and the choice are
   compared on the same footing with the most samples.

Per cell: the choice, the oracle, measured(choice) / measured(oracle), and the cost model's prediction error
for the choice, ``|predicted - measured| / measured``. ``summary``: ``cells``, ``frac_within_5pct``,
``max_ratio``, ``median_abs_prediction_error``.

Run: ``python -m bench.planner --out FILE.json [--models default,resnet50,mobilenet_v2]
[--bandwidths 0.5,2,10,50,200] [--rtts 5,50,150] [--workdir runs/bench_planner]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitinfer.daemons import Daemon, free_port
from splitinfer.models import EMBEDDED_MODELS

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("default", "resnet50", "mobilenet_v2")
REQUESTS = {"default": 100, "resnet50": 4, "mobilenet_v2": 12}
SCREEN = {"default": 34, "resnet50": 2, "mobilenet_v2": 4}  # first pass; contenders get REQUESTS more
WARMUP = 1
# The edge's CPU share per model. The default model's whole request takes ~1.5 ms of CPU, shorter than the
# smallest CFS quota (1 ms) plus its period; a quota would quantize its latency to periods instead of slowing
# it down uniformly, so it runs unthrottled (edge and server equally fast: edge-only should win every cell).
EDGE_CPU = {"default": 1.0, "resnet50": 0.25, "mobilenet_v2": 0.25}
CONTENDER_MARGIN = 1.15


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _daemon(name: str, args: list[str], log_path: Path, env: dict | None = None) -> Daemon:
    """A child process in the repository root, its output appended to ``log_path``; stopped by the caller
    (SIGTERM, SIGKILL after 15 s)."""
    return Daemon(args, name=name, log_path=log_path, cwd=ROOT,
                  env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, stop_timeout=15)


def start_server(bundle: Path, workdir: Path) -> tuple[Daemon, int]:
    """``python -m cloud_server serve`` (1 torch thread, 1 worker) on a free port, once its health check says
    SERVING."""
    port = free_port()
    server = _daemon("cloud server", [sys.executable, "-m", "cloud_server", "serve", "--bundle", str(bundle),
                                      "--port", str(port), "--metrics-port", str(free_port())],
                     workdir / "server.log",
                     env={"SPLITINFER_CLOUD_TORCH_THREADS": "1", "SPLITINFER_CLOUD_WORKERS": "1"})
    try:
        server.wait_grpc_ready(f"127.0.0.1:{port}", timeout=120)
    except BaseException:
        server.stop()
        raise
    return server, port


def start_emulator(target_port: int, rate_bps: float, rtt_s: float, workdir: Path) -> tuple[Daemon, int]:
    """``python -m bench.linkemu`` in front of ``target_port`` on a free port, once it listens."""
    port = free_port()
    emu = _daemon("link emulator", [sys.executable, "-m", "bench.linkemu", "--target", f"127.0.0.1:{target_port}",
                                    "--listen-port", str(port), "--rate", f"{rate_bps:.0f}",
                                    "--delay", f"{rtt_s / 2 * 1e3:.4f}ms"], workdir / "emulator.log")
    try:
        emu.wait_tcp_ready(port, timeout=30)
    except BaseException:
        emu.stop()
        raise
    return emu, port


@dataclass
class ModelSetup:
    name: str
    result: object  # partitioner.make.PlanResult (the edge worker loads its own inputs)


def plan_model(name: str, workdir: Path, repeats: int) -> ModelSetup:
    """Plan (profile here, 1 thread) and write the bundle whose operating points the cells switch between."""
    from partitioner.cost import Link
    from partitioner.make import PlanOptions, make_default_plan, make_model_plan
    from partitioner.target import load_target

    out = workdir / name / "bundle"
    link = Link(10e6, 0.05)
    if name in EMBEDDED_MODELS:
        result = make_default_plan(out, link, repeats=repeats, progress=True, model=name)
    else:
        result = make_model_plan(out, load_target(name), PlanOptions(link=link, repeats=repeats, progress=True))
    return ModelSetup(name, result)


class CpuLimit:
    """A cgroup (v1 ``cpu`` controller, or v2) limiting its processes to ``fraction`` of one CPU."""

    QUOTA_US = 1_000  # the smallest CFS quota: short periods keep stalls short, so the slowdown is nearly uniform

    def __init__(self, fraction: float, name: str = "splitinfer_bench_edge"):
        self.fraction = fraction
        self.path: Path | None = None
        if fraction >= 1:
            return
        quota = self.QUOTA_US
        period = int(round(quota / fraction))
        v1 = Path("/sys/fs/cgroup/cpu")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path = v1 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        elif (v2 / "cgroup.controllers").exists():
            self.path = v2 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {period}")
        else:
            raise RuntimeError("no cgroup cpu controller here: run with --edge-cpu 1")

    def add(self, pid: int) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.rmdir()


class EdgeWorker:
    """``bench.edge_worker`` as a child process, driven by JSON lines."""

    def __init__(self, bundle: Path, n_inputs: int, log_path: Path, limit: CpuLimit):
        self._start(["--bundle", str(bundle), "--inputs", str(n_inputs)], log_path, limit)

    def _start(self, args: list[str], log_path: Path, limit: CpuLimit) -> None:
        """Start ``python -m bench.edge_worker ARGS`` (stderr to ``log_path``) inside ``limit``."""
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.edge_worker", *args], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        limit.add(self.proc.pid)

    def call(self, **msg) -> dict:
        """Send one command and wait for its answer."""
        self.send(**msg)
        return self.receive()

    def send(self, **msg) -> None:
        """Send one command without waiting (pair with :meth:`receive`)."""
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        """The answer to the command sent last; raises when the worker died or reported an error."""
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"edge worker died (exit {self.proc.poll()}); see its log")
        out = json.loads(line)
        if not out.get("ok"):
            raise RuntimeError(f"edge worker: {out.get('error')}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                self.call(cmd="quit")
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def measure(worker: EdgeWorker, n: int, split: int, codec: str | None, exits: list[int],
            thresholds: dict[int, float] | None = None, offset: int = 0) -> list[float]:
    """End-to-end latency (ms) of ``n`` requests at one operating point, after warm-up, on the worker's inputs
    from ``offset``; ``codec`` None: the plan's where it applies; ``thresholds`` replace the bundle's exit
    thresholds for those exits (the plan's own when None)."""
    worker.call(cmd="set", split=split, codec=codec, exits=exits, thresholds=thresholds)
    out = worker.call(cmd="run", n=n, warmup=WARMUP, offset=offset)
    if out["degraded"]:
        raise RuntimeError(f"{out['degraded']} requests degraded at split {split} ({codec}): no server answer")
    return out["wall_ms"]


def edge_planner(result, edge_profile):
    """The plan's planner with the edge profile measured on the (CPU-limited) edge; a learned codec keeps its
    payload size, and its encode time is scaled like the edge's compute."""
    import dataclasses

    from partitioner.profile import Profile

    planner = result.planner
    base = planner.codecs[0].edge
    scale = sum(edge_profile.stage_ms) / max(1e-9, sum(base.stage_ms))
    codecs = []
    for c in planner.codecs:
        if c.boundaries is None:
            codecs.append(dataclasses.replace(c, edge=edge_profile))
            continue
        e: Profile = dataclasses.replace(edge_profile, encode_ms=list(edge_profile.encode_ms),
                                         payload_bytes=list(edge_profile.payload_bytes))
        for k in c.boundaries:
            e.encode_ms[k] = c.edge.encode_ms[k] * scale
            e.payload_bytes[k] = c.edge.payload_bytes[k]
        codecs.append(dataclasses.replace(c, edge=e))
    return dataclasses.replace(planner, codecs=codecs), scale


def probe_link(port: int) -> dict:
    from partitioner.probe import probe

    res = probe(f"127.0.0.1:{port}", rtt_calls=8, size_calls=2, target_s=0.25, max_bytes=4 << 20)
    return {"rtt_ms": res.rtt_ms, "bandwidth_bps": res.bandwidth_bps, "sizes": res.sizes, "call_ms": res.call_ms}


def run_cell(setup: ModelSetup, planner, worker: EdgeWorker, bw: float, rtt: float, probed: dict) -> dict:
    from partitioner.cost import Link
    from partitioner.make import per_split
    from partitioner.search import Constraints, Objective

    link = Link(probed["bandwidth_bps"] or bw, probed["rtt_ms"] / 1e3)
    obj, cons = Objective(), Constraints()
    chosen = planner.choose(link, obj, cons)
    by_split: dict[int, object] = {}
    for e in per_split(planner, link, obj, cons):  # the planner's pick at each split: best over codecs
        if e.split not in by_split or e.expected_latency_ms < by_split[e.split].expected_latency_ms:
            by_split[e.split] = e
    by_split[chosen.split] = chosen
    n = setup.result.plan.boundaries[-1].index
    order = [chosen.split] + ([n] if n != chosen.split else [])
    order += [e.split for e in sorted(by_split.values(), key=lambda e: e.expected_latency_ms) if e.split not in order]
    samples: dict[int, list[float]] = {}
    skipped = []
    best = float("inf")
    for k in order:
        e = by_split[k]
        if k < n:
            bound = e.offload_rate * ((e.bytes_per_offload * 8 / bw) + rtt) * 1e3
            if bound >= best and k != chosen.split:
                skipped.append(k)
                continue
        samples[k] = measure(worker, SCREEN[setup.name], k, e.codec, e.exits)
        best = min(best, statistics.fmean(samples[k]))
    contenders = [k for k, v in samples.items() if statistics.fmean(v) <= CONTENDER_MARGIN * best]
    for k in sorted(set(contenders) | {chosen.split}):
        e = by_split[k]
        samples[k] += measure(worker, REQUESTS[setup.name], k, e.codec, e.exits)
    means = {k: statistics.fmean(v) for k, v in samples.items()}
    oracle = min(means, key=means.get)
    measured_choice = means[chosen.split]
    return {
        "bandwidth_mbps": bw / 1e6, "rtt_ms": rtt * 1e3, "probed": probed,
        "choice": {"split": chosen.split, "codec": chosen.codec, "exits": chosen.exits,
                   "predicted_ms": round(chosen.expected_latency_ms, 3), "measured_ms": round(measured_choice, 3)},
        "oracle": {"split": oracle, "codec": by_split[oracle].codec, "exits": by_split[oracle].exits,
                   "predicted_ms": round(by_split[oracle].expected_latency_ms, 3),
                   "measured_ms": round(means[oracle], 3)},
        "ratio": round(measured_choice / means[oracle], 4),
        "prediction_error": round(abs(chosen.expected_latency_ms - measured_choice) / measured_choice, 4),
        "measured_splits": {str(k): {"mean_ms": round(means[k], 3), "n": len(samples[k]),
                                     "p50_ms": round(statistics.median(samples[k]), 3),
                                     "predicted_ms": round(by_split[k].expected_latency_ms, 3),
                                     "codec": by_split[k].codec, "exits": by_split[k].exits}
                            for k in sorted(samples)},
        "skipped_splits": sorted(skipped),
    }


def run_model(name: str, bandwidths: list[float], rtts: list[float], workdir: Path, repeats: int,
              probes: dict, limit: CpuLimit) -> tuple[list[dict], dict]:
    wd = workdir / name
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup = plan_model(name, workdir, repeats)
    _log(f"{name}: planned in {time.perf_counter() - t0:.1f} s; {setup.result.plan.boundaries[-1].index} stages")
    from partitioner.profile import Profile

    worker = EdgeWorker(setup.result.path, REQUESTS[name] + WARMUP, wd / "edge.log", limit)
    server, port = start_server(setup.result.path, wd)
    cells = []
    try:
        edge_prof = Profile.from_dict(worker.call(cmd="profile", repeats=repeats)["profile"])
        planner, scale = edge_planner(setup.result, edge_prof)
        overhead = worker.call(cmd="overhead", n=30 if name != "resnet50" else 8)["overhead_ms"]
        for c in planner.codecs:
            c.edge.request_overhead_ms = max(0.0, overhead)
        info = {"edge_slowdown_measured": round(scale, 3), "agent_overhead_ms": round(overhead, 4),
                "edge_total_ms": round(sum(edge_prof.stage_ms), 3),
                "server_total_ms": round(sum(setup.result.profile.stage_ms), 3)}
        _log(f"{name}: edge profile {info['edge_total_ms']} ms (x{scale:.2f} the server's), agent overhead "
             f"{overhead:.3f} ms")
        for bw in bandwidths:
            for rtt in rtts:
                emu, eport = start_emulator(port, bw, rtt, wd)
                try:
                    t1 = time.perf_counter()
                    if (bw, rtt) not in probes:
                        probes[(bw, rtt)] = probe_link(eport)
                    worker.call(cmd="connect", address=f"127.0.0.1:{eport}")
                    cell = run_cell(setup, planner, worker, bw, rtt, probes[(bw, rtt)])
                finally:
                    emu.stop()
                cell["model"] = name
                cell["seconds"] = round(time.perf_counter() - t1, 1)
                cells.append(cell)
                _log(f"{name} {bw / 1e6:g} Mbit/s RTT {rtt * 1e3:g} ms: choice {cell['choice']['split']} "
                     f"{cell['choice']['measured_ms']:.1f} ms (pred {cell['choice']['predicted_ms']:.1f}), oracle "
                     f"{cell['oracle']['split']} {cell['oracle']['measured_ms']:.1f} ms, ratio {cell['ratio']:.3f}, "
                     f"{len(cell['measured_splits'])} measured / {len(cell['skipped_splits'])} skipped, "
                     f"{cell['seconds']} s")
    finally:
        worker.close()
        server.stop()
    return cells, info


def summarize(cells: list[dict]) -> dict:
    ratios = [c["ratio"] for c in cells]
    errors = [c["prediction_error"] for c in cells]
    return {"cells": len(cells), "frac_within_5pct": round(float(np.mean([r <= 1.05 for r in ratios])), 4),
            "frac_within_15pct": round(float(np.mean([r <= 1.15 for r in ratios])), 4),
            "max_ratio": round(max(ratios), 4), "median_ratio": round(float(np.median(ratios)), 4),
            "median_abs_prediction_error": round(float(np.median(errors)), 4),
            "max_abs_prediction_error": round(max(errors), 4)}


def table(cells: list[dict]) -> str:
    lines = [f"{'model':>13} {'Mbit/s':>7} {'RTT':>5} {'choice':>12} {'oracle':>12} {'chosen ms':>10} "
             f"{'oracle ms':>10} {'ratio':>6} {'pred err':>8}"]
    for c in cells:
        ch, orc = c["choice"], c["oracle"]
        lines.append(f"{c['model']:>13} {c['bandwidth_mbps']:>7g} {c['rtt_ms']:>5g} "
                     f"{str(ch['split']) + ' ' + ch['codec'][:6]:>12} {str(orc['split']) + ' ' + orc['codec'][:6]:>12} "
                     f"{ch['measured_ms']:>10.2f} {orc['measured_ms']:>10.2f} {c['ratio']:>6.3f} "
                     f"{c['prediction_error']:>8.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--bandwidths", default="0.5,2,10,50,200", help="Mbit/s")
    ap.add_argument("--rtts", default="5,50,150", help="ms")
    ap.add_argument("--repeats", type=int, default=30, help="profiling runs per stage")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_planner"))
    ap.add_argument("--edge-cpu", type=float, default=None, help="CPU share of the edge process (cgroup) for every "
                                                                  "model; default: per model (EDGE_CPU); 1 = none")
    args = ap.parse_args(argv)
    from splitinfer.allocator import tune_allocator

    tune_allocator()  # as the daemons and the profiler do
    torch.set_num_threads(1)
    bandwidths = [float(v) * 1e6 for v in args.bandwidths.split(",")]
    rtts = [float(v) / 1e3 for v in args.rtts.split(",")]
    started = time.perf_counter()
    cells: list[dict] = []
    probes: dict = {}
    models: dict[str, dict] = {}
    for name in (n.strip() for n in args.models.split(",")):
        share = args.edge_cpu if args.edge_cpu is not None else EDGE_CPU.get(name, 0.25)
        limit = CpuLimit(share)
        try:
            c, info = run_model(name, bandwidths, rtts, args.workdir, args.repeats, probes, limit)
        finally:
            limit.close()
        info["edge_cpu_share"] = share
        cells += c
        models[name] = info
    per_model = {m: summarize([c for c in cells if c["model"] == m]) for m in dict.fromkeys(c["model"] for c in cells)}
    for m, info in models.items():
        per_model.setdefault(m, {}).update(info)
    out = {"summary": summarize(cells), "per_model": per_model, "cells": cells,
           "settings": {"bandwidths_mbps": [b / 1e6 for b in bandwidths], "rtts_ms": [r * 1e3 for r in rtts],
                        "requests": {m: REQUESTS[m] for m in per_model}, "warmup": WARMUP,
                        "screen": {m: SCREEN[m] for m in per_model},
                        "edge_threads": 1, "server_threads": 1, "profile_repeats": args.repeats,
                        "edge_cpu_share": {m: i["edge_cpu_share"] for m, i in models.items()},
                        "machine": os.uname().nodename, "cpus": os.cpu_count()},
           "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(table(cells))
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
