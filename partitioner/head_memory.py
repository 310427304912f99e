"""Measured memory of a bundle's head on the edge, for ``plan make --max-edge-memory``.

A fresh process (``python -m partitioner.head_memory BUNDLE``) imports torch and the core, tunes malloc as the
agent does, resets its peak resident set (writing ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the
current ``VmRSS``), records ``VmRSS``, then loads the bundle as the edge agent does
(:func:`splitinfer.bundle.load_bundle`, every check) and runs the planned head (its split and active exits,
exits never firing, so every stage up to the split runs) on ``--requests`` inputs of the plan's shape, one at a
time. The figure is ``VmHWM`` after the requests minus ``VmRSS`` before loading: the peak resident memory the
bundle and its head add to the process, interpreter and libraries already loaded excluded (a learned codec's
ONNX Runtime sessions, built at load, are included). The computed figure (head weights + largest activations)
is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_here(bundle: Path, requests: int = 20) -> dict:
    """Run in the measuring process: see the module docstring."""
    import math

    import numpy as np
    import torch

    from splitinfer.allocator import tune_allocator
    from splitinfer.bundle import load_bundle
    from splitinfer.head import ExitPolicy, run_head
    from splitinfer.torch_head import TorchStages

    tune_allocator()  # as the edge agent does
    torch.set_num_threads(1)
    torch.zeros(8).add_(1)  # the allocator's first arena, not the head's
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = _status_kb("VmRSS")
    b = load_bundle(bundle)
    plan = b.plan
    backend = TorchStages(b.staged, b.exits, head=b.edge_head() if plan.head.kind != "fp32" else None)
    policy = ExitPolicy(dict.fromkeys(plan.active_exits, math.inf))
    x = torch.from_numpy(np.zeros([1, *plan.input.shape], dtype=np.float32))
    with torch.inference_mode():
        for _ in range(requests):
            run_head(backend, policy, x, plan.split, plan.active_exits)
    peak = _status_kb("VmHWM")
    computed = next((e.edge_memory_bytes for e in plan.estimates if e.split == plan.split and e.codec == plan.codec.name
                     and e.edge_memory_bytes is not None), None)
    return {"head_peak_bytes": max(0, peak - before) * 1024, "rss_before_kb": before, "hwm_after_kb": peak,
            "peak_reset": reset, "computed_bytes": computed, "split": plan.split, "requests": requests}


def measure(bundle: Path, requests: int = 20, timeout: float = 300) -> dict:
    """Measure ``bundle``'s head in a fresh process (module docstring); RuntimeError when that process fails."""
    proc = subprocess.run([sys.executable, "-m", "partitioner.head_memory", str(bundle), "--requests", str(requests)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring the head's memory failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="peak resident memory a bundle's head adds to a fresh process")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args(argv)
    print(json.dumps(measure_here(args.bundle, args.requests)))


if __name__ == "__main__":
    main()
