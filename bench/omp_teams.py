"""Benchmark: the heavy tail on a worker thread, before and after the OpenMP-team fix (splitinfer/omp_teams.py).

``python -m bench.omp_teams --out FILE.json [--rounds 3] [--runs 30] [--quick]``

The tail is torchvision ResNet-50 (random weights) after ``layer2``: ``layer3``, ``layer4``, pooling and the
classifier on one ``[1, 512, 28, 28]`` tensor, 2 torch intra-op threads: bench.serving's heavy tail. Three layouts,
each in a fresh child process (libgomp's teams live as long as their threads, so layouts cannot share a process),
the children alternating round by round so that the machine's slower and faster phases weigh on all alike:

* ``main``: built and run on the process's main thread (one OpenMP team): the reference.
* ``before``: built in a pooled thread that lives on (what ``asyncio.to_thread`` did when the cloud server loaded a
  bundle), run in a worker thread (the server's tail worker): two teams of 2 threads on this machine's CPUs.
* ``after``: built in a thread that exits afterwards (:func:`splitinfer.omp_teams.run_in_own_thread`, what the
  server does now), run in a worker thread: one team.

Per layout: p50 and p90 of the wall time of one forward pass and the voluntary context switches per pass
(``getrusage``: threads going to sleep between the forward's parallel regions). Summary: ``before_vs_main`` and
``after_vs_main`` (ratios of the medians over rounds), ``before_vs_after_per_round`` (within each round: the
machine's slower and faster phases move all layouts of a round alike) and the context switches.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LAYOUTS = ("main", "before", "after")
THREADS = 2


def _build():
    import torch
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval()
    tail = torch.nn.Sequential(m.layer3, m.layer4, m.avgpool, torch.nn.Flatten(), m.fc).eval()
    x = torch.randn(1, 512, 28, 28)
    with torch.inference_mode():
        tail(x)  # what loading does: one forward (shape propagation, warm-up) on the loading thread
    return tail, x


def child(layout: str, runs: int) -> dict:
    """Measure one layout in this process; returns its timings."""
    import torch

    torch.set_num_threads(THREADS)
    if layout == "main":
        tail, x = _build()
        run_on = None
    else:
        box: dict = {}
        if layout == "before":
            loader = ThreadPoolExecutor(1, thread_name_prefix="loader")  # lives on, like asyncio's default pool
            box["m"] = loader.submit(_build).result()
        else:
            t = threading.Thread(target=lambda: box.update(m=_build()))
            t.start()
            t.join()
        tail, x = box["m"]
        run_on = ThreadPoolExecutor(1, thread_name_prefix="tail")

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            tail(x)
        return time.perf_counter() - t0

    def call() -> float:
        return forward() if run_on is None else run_on.submit(forward).result()

    for _ in range(3):
        call()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    times = [call() for _ in range(runs)]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    times.sort()
    return {"layout": layout, "runs": runs, "ms_p50": round(statistics.median(times) * 1e3, 3),
            "ms_p90": round(times[int(0.9 * (len(times) - 1))] * 1e3, 3),
            "voluntary_switches_per_run": round((r1.ru_nvcsw - r0.ru_nvcsw) / runs, 1),
            "involuntary_switches_per_run": round((r1.ru_nivcsw - r0.ru_nivcsw) / runs, 1)}


def _p50(rows: list[dict], rnd: int, layout: str) -> float:
    return next(row["ms_p50"] for row in rows if row["round"] == rnd and row["layout"] == layout)


def run(rounds: int, runs: int) -> dict:
    """Alternate the layouts' child processes for ``rounds`` rounds; returns rows and a summary."""
    rows = []
    for r in range(rounds):
        order = LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]
        for layout in order:
            out = subprocess.run([sys.executable, "-m", "bench.omp_teams", "--child", layout, "--runs", str(runs)],
                                 capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["round"] = r
            rows.append(row)
            print(f"round {r} {layout:6s} p50 {row['ms_p50']:8.2f} ms  voluntary switches/run "
                  f"{row['voluntary_switches_per_run']:6.1f}", flush=True)
    p50 = {lay: statistics.median(row["ms_p50"] for row in rows if row["layout"] == lay) for lay in LAYOUTS}
    vcs = {lay: statistics.median(row["voluntary_switches_per_run"] for row in rows if row["layout"] == lay)
           for lay in LAYOUTS}
    summary = {"threads": THREADS, "rounds": rounds, "runs_per_child": runs,
               "ms_p50": {k: round(v, 3) for k, v in p50.items()},
               "before_vs_main": round(p50["before"] / p50["main"], 3),
               "after_vs_main": round(p50["after"] / p50["main"], 3),
               "before_vs_after_per_round": [round(_p50(rows, r, "before") / _p50(rows, r, "after"), 3)
                                             for r in range(rounds)],
               "voluntary_switches_per_run": vcs}
    return {"summary": summary, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="JSON result file")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30, help="forward passes per child")
    ap.add_argument("--quick", action="store_true", help="1 round of 3 runs (smoke test)")
    ap.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.runs)))
        return 0
    if a.quick:
        a.rounds, a.runs = 1, 3
    t0 = time.time()
    result = run(a.rounds, a.runs)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result["summary"], indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
