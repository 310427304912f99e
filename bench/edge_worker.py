"""The edge side of the link benchmarks, as its own process (so it can run in a CPU-limited cgroup, i.e. as a
slower device): the real :class:`edge_agent.runtime.EdgeRuntime` on a bundle, driven by JSON lines on stdin.

Commands (one JSON object per line; one JSON answer per line on stdout):

* ``{"cmd": "profile", "repeats": R}``: profile the bundle's model here (1 thread) -> the profile dict
* ``{"cmd": "connect", "address": "HOST:PORT"}``: (re)build the runtime against a server address
* ``{"cmd": "set", "split": k, "codec": c, "exits": [...]}``: switch the operating point
* ``{"cmd": "run", "n": N, "warmup": W}``: answer inputs ``0..N-1`` -> wall ms per request, latency parts, flags
* ``{"cmd": "overhead", "n": N}``: edge-only with every exit: the median over requests of wall time minus the
  profiled cost of the path the request took (stages up to where it was answered, plus the exits evaluated)
* ``{"cmd": "quit"}``

Inputs: the Fashion-MNIST test images for the default model, seeded random tensors otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _inputs(bundle, n: int) -> torch.Tensor:
    if bundle.plan.model.name == "default":
        from splitinfer.data import load_fashion_mnist, to_model_input

        test = load_fashion_mnist("test")
        return to_model_input(test.images[:n], bundle.plan.input.mean, bundle.plan.input.std)
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *bundle.plan.input.shape, generator=g)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--inputs", type=int, default=100)
    args = ap.parse_args(argv)

    from edge_agent.metrics import EdgeMetrics
    from edge_agent.runtime import EdgeRuntime
    from edge_agent.settings import EdgeSettings
    from edge_agent.transport import CloudClient
    from splitinfer.allocator import tune_allocator
    from splitinfer.bundle import load_bundle

    tune_allocator()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    inputs = _inputs(bundle, args.inputs)
    runtime: EdgeRuntime | None = None
    stage_ms: list[float] = []
    exit_ms: dict[int, float] = {}

    def connect(address: str) -> EdgeRuntime:
        client = CloudClient(address, bundle.plan.model.name, timeout_s=120.0)
        settings = EdgeSettings(bundle=args.bundle, server=address, timeout_s=120.0)
        return EdgeRuntime(bundle, client, settings, metrics=EdgeMetrics())

    def answer(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "quit":
                break
            if cmd == "profile":
                from partitioner.profile import profile_model

                prof = profile_model(bundle.staged, bundle.exits, bundle.codec_for("uint8-affine", 0),
                                     inputs[:1], repeats=int(msg.get("repeats", 30)), threads=1,
                                     model_name=bundle.plan.model.name)
                stage_ms = list(prof.stage_ms)
                exit_ms = dict(prof.exit_ms)
                answer({"ok": True, "profile": prof.to_dict()})
            elif cmd == "connect":
                if runtime is not None:
                    runtime.close()
                runtime = connect(msg["address"])
                answer({"ok": True})
            elif cmd == "set":
                runtime.set_operating_point(int(msg["split"]), msg.get("codec"), msg.get("exits"))
                answer({"ok": True})
            elif cmd == "run":
                n, warmup = int(msg["n"]), int(msg.get("warmup", 2))
                for i in range(warmup):
                    runtime.infer(inputs[i : i + 1], "warmup")
                walls, degraded = [], 0
                for i in range(n):
                    t0 = time.perf_counter()
                    res = runtime.infer(inputs[i : i + 1], f"r{i}")
                    walls.append((time.perf_counter() - t0) * 1e3)
                    degraded += bool(res.degraded)
                answer({"ok": True, "wall_ms": walls, "degraded": degraded})
            elif cmd == "overhead":
                n = int(msg.get("n", 30))
                if runtime is None:
                    runtime = connect("127.0.0.1:1")  # edge-only requests never call the server
                n_stages = bundle.staged.num_stages
                runtime.set_operating_point(n_stages, exits=sorted(bundle.exits))
                for i in range(3):
                    runtime.infer(inputs[i : i + 1], "warmup")
                extra = []
                for i in range(n):
                    t0 = time.perf_counter()
                    res = runtime.infer(inputs[i % len(inputs) : i % len(inputs) + 1], f"o{i}")
                    wall = (time.perf_counter() - t0) * 1e3
                    upto = res.decided_by if isinstance(res.decided_by, int) else n_stages
                    path = sum(stage_ms[:upto]) + sum(v for b, v in exit_ms.items() if b <= upto)
                    extra.append(wall - path)
                answer({"ok": True, "overhead_ms": statistics.median(extra)})
            else:
                answer({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:  # report to the driver, keep serving
            answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    if runtime is not None:
        runtime.close()


if __name__ == "__main__":
    main()
