"""Benchmark: the planner's choice against a brute-force oracle, measured end to end over the link emulator.

For each model (``default`` with its exits and learned codec; ``resnet50`` and ``mobilenet_v2`` with random
weights, for timing) and each cell of bandwidths x RTTs:

1. The planner plans the cell from profiles measured at the start of this run (edge: this process, 1 torch
   thread; server: the same machine, 1 thread) and the cell's link (bandwidth, RTT). For every split it also
   names the configuration (codec, exits) it would use there.
2. A real cloud server (``python -m cloud_server serve``, 1 torch thread, 1 worker) serves the model's bundle;
   the real edge runtime (:class:`edge_agent.runtime.EdgeRuntime`, 1 torch thread) talks to it through the link
   emulator (``python -m partitioner.linkemu``, a separate process: rate each way, one-way delay RTT/2).
3. Every split is measured, the planner's choice first and edge-only second, the rest by predicted latency:
   the mean end-to-end latency of ``--requests`` requests (after warm-up). A split is skipped when a lower bound
   of its mean latency already exceeds the best mean measured in the cell: the offloaded fraction ``q`` of
   requests each pays at least the uplink transfer (payload / bandwidth) and the emulated RTT, so its mean is
   at least ``q * (transfer + RTT)``.
4. Configurations within 10 % of the cell's best (the choice included) are measured again and their samples
   pooled, so the oracle (the measured best) and the choice are compared on the same footing.

Per cell: the choice, the oracle, measured(choice) / measured(oracle), and the cost model's prediction error
for the choice, ``|predicted - measured| / measured``. ``summary``: ``cells``, ``frac_within_5pct``,
``max_ratio``, ``median_abs_prediction_error``.

Run: ``python -m bench.planner --out FILE.json [--models default,resnet50,mobilenet_v2]
[--bandwidths 0.5,2,10,50,200] [--rtts 5,50,150] [--workdir runs/bench_planner]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("default", "resnet50", "mobilenet_v2")
REQUESTS = {"default": 100, "resnet50": 6, "mobilenet_v2": 12}
WARMUP = 2
CONTENDER_MARGIN = 1.10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Process:
    """A child process that is stopped on exit."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _wait_port(port: int, proc: Process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"process {proc.proc.args} exited with {proc.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout} s")


def start_server(bundle: Path, workdir: Path) -> tuple[Process, int]:
    port = _free_port()
    proc = Process([sys.executable, "-m", "cloud_server", "serve", "--bundle", str(bundle), "--port", str(port),
                    "--metrics-port", str(_free_port())], workdir / "server.log",
                   env={"SPLITINFER_CLOUD_TORCH_THREADS": "1", "SPLITINFER_CLOUD_WORKERS": "1"})
    _wait_port(port, proc, 120)
    return proc, port


def start_emulator(target_port: int, rate_bps: float, rtt_s: float, workdir: Path) -> tuple[Process, int]:
    port = _free_port()
    proc = Process([sys.executable, "-m", "partitioner.linkemu", "--target", f"127.0.0.1:{target_port}",
                    "--listen-port", str(port), "--rate", f"{rate_bps:.0f}", "--delay", f"{rtt_s / 2 * 1e3:.4f}ms"],
                   workdir / "emulator.log")
    _wait_port(port, proc, 30)
    return proc, port


@dataclass
class ModelSetup:
    name: str
    result: object  # partitioner.make.PlanResult
    inputs: torch.Tensor


def plan_model(name: str, workdir: Path, repeats: int) -> ModelSetup:
    """Plan (profile here, 1 thread) and write the bundle whose operating points the cells switch between."""
    from partitioner.cost import Link
    from partitioner.make import PlanOptions, make_default_plan, make_model_plan
    from partitioner.target import load_target

    out = workdir / name / "bundle"
    link = Link(10e6, 0.05)
    if name == "default":
        from splitinfer.data import load_fashion_mnist, to_model_input

        result = make_default_plan(out, link, repeats=repeats, progress=True)
        test = load_fashion_mnist("test")
        x = to_model_input(test.images[:REQUESTS[name]], result.plan.input.mean, result.plan.input.std)
    else:
        target = load_target(name)
        result = make_model_plan(out, target, PlanOptions(link=link, repeats=repeats, progress=True))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(REQUESTS[name], *target.input_spec.shape, generator=g)
    return ModelSetup(name, result, x)


def measure(runtime, inputs: torch.Tensor, split: int, codec: str, exits: list[int]) -> list[float]:
    """End-to-end latency (ms) of each input at one operating point, after warm-up."""
    runtime.set_operating_point(split, codec, exits)
    for i in range(WARMUP):
        runtime.infer(inputs[i : i + 1], "warmup")
    out = []
    for i in range(len(inputs)):
        t0 = time.perf_counter()
        res = runtime.infer(inputs[i : i + 1], f"r{i}")
        out.append((time.perf_counter() - t0) * 1e3)
        if res.degraded:
            raise RuntimeError(f"request degraded at split {split} ({codec}): the server did not answer in time")
    return out


def run_cell(setup: ModelSetup, runtime, bw: float, rtt: float) -> dict:
    from partitioner.cost import Link
    from partitioner.make import per_split
    from partitioner.search import Constraints, Objective

    planner = setup.result.planner
    link = Link(bw, rtt)
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
        samples[k] = measure(runtime, setup.inputs, k, e.codec, e.exits)
        best = min(best, statistics.fmean(samples[k]))
    contenders = [k for k, v in samples.items() if statistics.fmean(v) <= CONTENDER_MARGIN * best]
    for k in sorted(set(contenders) | {chosen.split}):
        e = by_split[k]
        samples[k] += measure(runtime, setup.inputs, k, e.codec, e.exits)
    means = {k: statistics.fmean(v) for k, v in samples.items()}
    oracle = min(means, key=means.get)
    measured_choice = means[chosen.split]
    return {
        "bandwidth_mbps": bw / 1e6, "rtt_ms": rtt * 1e3,
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


def run_model(name: str, bandwidths: list[float], rtts: list[float], workdir: Path, repeats: int) -> list[dict]:
    from edge_agent.metrics import EdgeMetrics
    from edge_agent.runtime import EdgeRuntime
    from edge_agent.settings import EdgeSettings
    from edge_agent.transport import CloudClient
    from splitinfer.bundle import load_bundle

    wd = workdir / name
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup = plan_model(name, workdir, repeats)
    _log(f"{name}: planned in {time.perf_counter() - t0:.1f} s; {setup.result.plan.boundaries[-1].index} stages")
    bundle = load_bundle(setup.result.path)
    server, port = start_server(setup.result.path, wd)
    cells = []
    try:
        for bw in bandwidths:
            for rtt in rtts:
                emu, eport = start_emulator(port, bw, rtt, wd)
                client = CloudClient(f"127.0.0.1:{eport}", bundle.plan.model.name, timeout_s=60.0)
                settings = EdgeSettings(bundle=setup.result.path, server=f"127.0.0.1:{eport}", timeout_s=60.0)
                runtime = EdgeRuntime(bundle, client, settings, metrics=EdgeMetrics())
                try:
                    t1 = time.perf_counter()
                    cell = run_cell(setup, runtime, bw, rtt)
                finally:
                    runtime.close()
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
        server.stop()
    return cells


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
    args = ap.parse_args(argv)
    from splitinfer.allocator import tune_allocator

    tune_allocator()  # as the daemons and the profiler do
    torch.set_num_threads(1)
    bandwidths = [float(v) * 1e6 for v in args.bandwidths.split(",")]
    rtts = [float(v) / 1e3 for v in args.rtts.split(",")]
    started = time.perf_counter()
    cells: list[dict] = []
    for name in args.models.split(","):
        cells += run_model(name.strip(), bandwidths, rtts, args.workdir, args.repeats)
    per_model = {m: summarize([c for c in cells if c["model"] == m]) for m in dict.fromkeys(c["model"] for c in cells)}
    out = {"summary": summarize(cells), "per_model": per_model, "cells": cells,
           "settings": {"bandwidths_mbps": [b / 1e6 for b in bandwidths], "rtts_ms": [r * 1e3 for r in rtts],
                        "requests": {m: REQUESTS[m] for m in per_model}, "warmup": WARMUP,
                        "edge_threads": 1, "server_threads": 1, "profile_repeats": args.repeats,
                        "machine": os.uname().nodename, "cpus": os.cpu_count()},
           "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(table(cells))
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
