"""Benchmark: the edge head on ONNX Runtime (edge_agent/onnx_head/) versus torch, in the same run.

Configurations (the embedded default model, committed weights, exit thresholds certified on the validation
images like ``plan make`` does, epsilon 0.01 / delta 0.05):

* ``demo``: what ``splitinfer demo`` plans (5 Mbit/s, 20 ms, Raspberry Pi 4 profile): split 6, the learned
  bottleneck codec, the exit at boundary 6 active;
* ``edge_only``: the full model on the device (split 17), every exit (3, 6, 8, 11) active.

Per configuration, in one process, on the same Fashion-MNIST test images (seeded random images when the
dataset is absent), batch 1, one thread for both (``torch.set_num_threads(1)``; ORT intra-op 1, sequential),
torch and ORT interleaved request by request:

Every head runs through the one walk (:func:`splitinfer.head.walk`) and every exit is scored by the one policy
(:class:`splitinfer.head.ExitPolicy`, thresholds from the plan); only the stage backend differs:
:class:`splitinfer.torch_head.TorchStages` (torch) or :class:`edge_agent.onnx_head.OnnxHead` (ORT).

* ``head``: the offload path's head work: stages to the split with every active exit evaluated and scored, no
  early stop (torch: ``TorchStages`` under inference_mode; ORT: ``OnnxHead``);
* ``encode``: the planned codec on the split tensor (torch: the bundle's codec object as the runtime calls it, the
  learned codec's encoder already on ORT there; ORT: the torch-free numpy/ORT encoder);
* ``policy``: the request as the agent decides it: :func:`splitinfer.head.run_head` (stop at the first confident
  exit), else the answer at the last stage or the encoded split tensor (torch: ``TorchStages`` + the bundle's
  codec; ORT: :class:`edge_agent.onnx_head.NumpyEdge`);
* ``view``: the ONNX head through ``OnnxHead.torch_view()`` on torch tensors (``TorchStages`` over the view).

p50/p95 in ms and the ratio torch/ORT. Also: exit decisions and payload bytes of the torch path vs the torch-free
path (identical fraction), and for uint8-affine at the demo split (a codec with 9,408 values per payload).

In fresh processes (median of ``--repeats``): import time, load time, time to ready, and peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) after loading and running ``--process-requests`` requests: a torch
process (``load_bundle`` + the torch head, as the agent does today) and an ORT-only process that never imports
torch (``OnnxHead.load`` + ``NumpyEdge``; it asserts ``'torch' not in sys.modules``), plus a bare
``python + numpy`` floor. This torch is a CUDA build: the torch process maps CUDA libraries; their resident share
is reported (``rss_cuda_libs_mb``, from /proc/self/smaps) so a CPU-only build can be estimated.

Disk: exported ONNX files per configuration vs the bundle's safetensors; installed package sizes.

Run: ``python -m bench.onnx_head --out FILE.json [--requests 10000] [--repeats 3] [--process-requests 300]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEMO_THRESHOLDS = {3: 0.8647, 6: 0.7289, 8: 0.8737, 11: 0.6294}  # the demo's certified ones, if no dataset
CONFIGS = {"demo": {"split": 6, "codec": "bottleneck", "exits": [6]},
           "edge_only": {"split": 17, "codec": "uint8-affine", "exits": [3, 6, 8, 11]}}


# ---------------------------------------------------------------------------------------------- bundles (torch)


def certified_thresholds(staged, exits, data_dir: str | None = None) -> tuple[dict[int, float], str]:
    """Exit thresholds as ``plan make`` certifies them on the validation images; the demo's figures without
    the dataset."""
    from partitioner.train import split_train_validation
    from splitinfer.calibration import calibrate, collect_scores
    from splitinfer.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, to_model_input
    from splitinfer.errors import DataError

    try:
        train = load_fashion_mnist("train", data_dir)
    except DataError:
        return dict(DEMO_THRESHOLDS), "the demo plan's (no dataset)"
    from partitioner.weights import load_default

    info = load_default()[3]
    _, va = split_train_validation(len(train), int(info["config"]["seed"]))
    x = to_model_input(train.images[va], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    cal = calibrate(collect_scores(staged, exits, x), 0.01, 0.05, seed=int(info["config"]["seed"]))
    return dict(zip(cal.boundaries, cal.thresholds, strict=True)), "certified on 5,000 validation images"


def default_bundle(path: Path, split: int, exits: list[int] | None, codec: str = "uint8-affine",
                   thresholds: dict[int, float] | None = None, learned: bool = True) -> Path:
    """A bundle of the committed default model (+ exit heads, + the committed bottleneck when ``learned``) with
    the given split, codec, active exits and thresholds (0.9 where not given)."""
    from partitioner.codec import load_default_bottleneck
    from partitioner.weights import load_default
    from splitinfer.bundle import CodecSpec, ExitSpec, InputSpec, new_plan, save_bundle
    from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD

    model, staged, heads, _ = load_default()
    bn = load_default_bottleneck()[0] if learned else None
    thresholds = thresholds or {}
    plan = new_plan(
        "default", staged,
        InputSpec(shape=[1, 28, 28], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD], labels=FASHION_MNIST_CLASSES),
        split=split, codec=CodecSpec(name=codec),
        learned_codecs=[CodecSpec(name="bottleneck", params=bn.cfg.to_params())] if bn is not None else [],
        exits=[ExitSpec(boundary=b, threshold=thresholds.get(b, 0.9)) for b in sorted(heads)],
        active_exits=exits)
    return save_bundle(path, plan, model, heads,
                       codec_states={bn.cfg.boundary: bn.state_for_bundle()} if bn is not None else None)


def sample_images(n: int, data_dir: str | None = None) -> tuple[np.ndarray, str]:
    """The first ``n`` Fashion-MNIST test images (uint8 [n, 28, 28]), or seeded random images without it."""
    from splitinfer.data import load_fashion_mnist
    from splitinfer.errors import DataError

    try:
        return np.asarray(load_fashion_mnist("test", data_dir).images[:n]), "Fashion-MNIST test"
    except DataError:
        return np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8), "random (no dataset)"


# ---------------------------------------------------------------------------------------------- in-process timing


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p95_ms": round(float(np.percentile(a, 95)), 4),
            "mean_ms": round(float(a.mean()), 4)}


def head_pass(backend, policy, x, split: int, exits: list[int]):
    """The offload path's head work on one backend: walk to ``split``, scoring every exit in ``exits`` with
    ``policy`` (no early stop); returns the split tensor."""
    from splitinfer.head import walk

    h = x
    for step in walk(backend, x, split, exits):
        if step.logits is not None:
            policy.check(step.boundary, step.logits)
        h = step.tensor
    return h


def measure_config(name: str, bundle_dir: Path, head_dir: Path, images: np.ndarray, warmup: int = 100) -> dict:
    """Latency (torch vs ORT, interleaved) and agreement of one configuration."""
    import torch

    from edge_agent.onnx_head import NumpyEdge, OnnxHead, numpy_codec
    from splitinfer.bundle import load_bundle
    from splitinfer.codec import UInt8AffineCodec
    from splitinfer.head import ExitPolicy, run_head, top1
    from splitinfer.torch_head import TorchStages

    bundle = load_bundle(bundle_dir)
    head = OnnxHead.load(head_dir, bundle_dir=bundle_dir)
    edge = NumpyEdge(head)
    plan = bundle.plan
    split, n = plan.split, bundle.num_stages
    exits = plan.planned_exits(bundle.exits)
    if edge.exits != exits or head.active_exits != exits:
        raise RuntimeError(f"the ONNX head evaluates exits {edge.exits}, the plan {exits}")
    policy = ExitPolicy.from_plan(plan)
    torch_stages = TorchStages(bundle.staged, bundle.exits)
    view = head.torch_view()
    view_stages = TorchStages(view, view.exits)  # the ONNX head on torch tensors
    codec = bundle.codec_for(plan.codec_at(split), split) if split < n else None
    x_all = edge.normalise(images)

    def torch_head(x):
        with torch.inference_mode():
            return head_pass(torch_stages, policy, x, split, exits)

    def ort_head(x):
        return head_pass(head, policy, x, split, exits)

    def view_head(x):
        with torch.inference_mode():
            return head_pass(view_stages, policy, x, split, exits)

    def torch_policy(x):
        with torch.inference_mode():
            out = run_head(torch_stages, policy, x, split, exits)
            if out.exit is not None:
                return out.exit.boundary, out.exit.label, None
            if codec is None:
                return n, top1(out.tensor.numpy())[1], None
            return "cloud", None, codec.encode(out.tensor)[0]

    def ort_policy(x):
        d = edge.infer(x)
        return d.decided_by, d.label, d.payload

    times: dict[str, list[float]] = {k: [] for k in ("torch_head", "ort_head", "view_head", "torch_encode",
                                                     "ort_encode", "torch_policy", "ort_policy", "torch_uint8",
                                                     "numpy_uint8")}
    agree = {"requests": 0, "same_decision": 0, "offloads": 0, "same_payload": 0, "uint8_same_payload": 0,
             "uint8_values_differing_max": 0, "uint8_values_differing_mean": 0.0, "uint8_max_step_diff": 0,
             "uint8_same_ranges": 0, "max_abs_diff_split_tensor": 0.0}
    u8, u8_numpy = UInt8AffineCodec(), numpy_codec("uint8-affine")
    u8_diffs = []
    for i in range(-warmup, len(x_all)):
        xn = x_all[i % len(x_all)][None]
        xt = torch.from_numpy(xn.copy())
        order = (0, 1) if i % 2 == 0 else (1, 0)
        out = {}
        for which in order:
            t = time.perf_counter()
            if which == 0:
                out["t"] = torch_head(xt.clone())
                key = "torch_head"
            else:
                out["o"] = ort_head(xn)
                key = "ort_head"
            if i >= 0:
                times[key].append(time.perf_counter() - t)
        t = time.perf_counter()
        view_head(xt.clone())
        if i >= 0:
            times["view_head"].append(time.perf_counter() - t)
        if codec is not None:
            for which in order:
                t = time.perf_counter()
                if which == 0:
                    pt = codec.encode(out["t"])[0]
                    key = "torch_encode"
                else:
                    po = edge.encoder.encode(out["o"])[0]
                    key = "ort_encode"
                if i >= 0:
                    times[key].append(time.perf_counter() - t)
            t = time.perf_counter()
            q_t = u8.encode(out["t"])[0]
            t1 = time.perf_counter()
            q_o = u8_numpy.encode(out["o"])[0]
            t2 = time.perf_counter()
            if i >= 0:
                times["torch_uint8"].append(t1 - t)
                times["numpy_uint8"].append(t2 - t1)
        for which in order:
            t = time.perf_counter()
            if which == 0:
                dt = torch_policy(xt.clone())
                key = "torch_policy"
            else:
                do = ort_policy(xn)
                key = "ort_policy"
            if i >= 0:
                times[key].append(time.perf_counter() - t)
        if i < 0:
            continue
        agree["requests"] += 1
        agree["max_abs_diff_split_tensor"] = max(agree["max_abs_diff_split_tensor"],
                                                 float(np.abs(out["t"].numpy() - out["o"]).max()))
        agree["same_decision"] += dt[:2] == do[:2]
        if codec is not None:
            agree["same_payload"] += pt == po
            agree["uint8_same_payload"] += q_t == q_o
            head_bytes = 8 * out["o"].shape[1]  # per-channel float32 minima and scales, then the values
            a = np.frombuffer(q_t, np.uint8, offset=head_bytes).astype(np.int16)
            b = np.frombuffer(q_o, np.uint8, offset=head_bytes).astype(np.int16)
            u8_diffs.append(int((a != b).sum()))
            agree["uint8_max_step_diff"] = max(agree["uint8_max_step_diff"], int(np.abs(a - b).max()))
            agree["uint8_same_ranges"] += q_t[:head_bytes] == q_o[:head_bytes]
            if dt[0] == "cloud":
                agree["offloads"] += 1
    if u8_diffs:
        agree["uint8_values_differing_max"] = int(max(u8_diffs))
        agree["uint8_values_differing_mean"] = round(float(np.mean(u8_diffs)), 2)
        agree["uint8_values_per_payload"] = int(np.prod(bundle.plan.boundaries[split].shape))
    lat = {k: _pct(v) for k, v in times.items() if v}
    ratios = {f"{k}_torch_over_ort_p50": round(lat[f"torch_{k}"]["p50_ms"] / lat[f"ort_{k}"]["p50_ms"], 3)
              for k in ("head", "encode", "policy") if f"torch_{k}" in lat}
    ratios["view_head_torch_over_view_p50"] = round(lat["torch_head"]["p50_ms"] / lat["view_head"]["p50_ms"], 3)
    return {"config": name, "split": split, "codec": codec.name if codec is not None else None,
            "exits": exits, "latency": lat, "ratios": ratios, "agreement": agree}


# ---------------------------------------------------------------------------------------------- fresh processes


def _cuda_rss_mb() -> float | None:
    """Resident MB of mappings from CUDA / triton libraries (torch's CUDA build), from /proc/self/smaps."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    total, current = 0, False
    for line in text.splitlines():
        if line and not line[0].isupper() or "-" in line.split(" ", 1)[0]:
            current = any(s in line for s in ("/nvidia/", "libtorch_cuda", "libc10_cuda", "/triton/", "libcu"))
        elif current and line.startswith("Rss:"):
            total += int(line.split()[1])
    return round(total / 1024, 1)


def _vm_hwm_mb() -> float | None:
    """Peak resident MB of this process's own address space (``VmHWM`` in /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def worker(kind: str, bundle_dir: str, head_dir: str, images_path: str, requests: int) -> dict:
    """One fresh process: import, load, run ``requests`` offload-path requests; report times and peak RSS."""
    t_start = time.perf_counter()
    images = np.load(images_path, allow_pickle=False)
    if kind == "numpy":
        return {"kind": kind, "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "vm_hwm_mb": _vm_hwm_mb()}
    from splitinfer.allocator import tune_allocator

    tune_allocator()
    t0 = time.perf_counter()
    if kind == "torch":
        import torch

        from splitinfer.bundle import load_bundle
        from splitinfer.data import to_model_input
        from splitinfer.head import ExitPolicy
        from splitinfer.torch_head import TorchStages

        torch.set_num_threads(1)
    else:
        from edge_agent.onnx_head import NumpyEdge, OnnxHead
    t1 = time.perf_counter()
    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "torch":
        bundle = load_bundle(bundle_dir)
        plan = bundle.plan
        split, n = plan.split, bundle.num_stages
        exits = plan.planned_exits(bundle.exits)
        policy = ExitPolicy.from_plan(plan)
        stages = TorchStages(bundle.staged, bundle.exits)
        codec = bundle.codec_for(plan.codec_at(split), split) if split < n else None
        x_all = to_model_input(images, plan.input.mean, plan.input.std)

        def one(i: int) -> None:
            with torch.inference_mode():
                h = head_pass(stages, policy, x_all[i : i + 1], split, exits)
                if codec is not None:
                    codec.encode(h)
    else:
        head = OnnxHead.load(head_dir, bundle_dir=bundle_dir)
        edge = NumpyEdge(head)
        x_all = edge.normalise(images)

        def one(i: int) -> None:
            h = head_pass(head, edge.policy, x_all[i : i + 1], edge.split, edge.exits)
            if edge.encoder is not None:
                edge.encoder.encode(h)
    t2 = time.perf_counter()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one(0)
    t3 = time.perf_counter()
    lat = []
    for i in range(requests):
        t = time.perf_counter()
        one(i % len(x_all))
        lat.append(time.perf_counter() - t)
    out = {"kind": kind, "import_s": round(t1 - t0, 4), "load_s": round(t2 - t1, 4),
           "first_request_ms": round((t3 - t2) * 1e3, 3), "ready_s": round(t3 - t_start, 4),
           "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 4),
           "maxrss_after_import_mb": round(rss_imported / 1024, 1), "maxrss_after_load_mb": round(rss_loaded / 1024, 1),
           "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "vm_hwm_mb": _vm_hwm_mb(), "rss_cuda_libs_mb": _cuda_rss_mb(), "torch_imported": "torch" in sys.modules,
           "onnxruntime_imported": "onnxruntime" in sys.modules}
    if kind == "onnx":
        assert "torch" not in sys.modules, "the ORT-only process imported torch"
    return out


_LAUNCHER = """
import json, subprocess, sys
for line in sys.stdin:
    argv, cwd = json.loads(line)
    p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    sys.stdout.write(json.dumps([p.returncode, p.stdout, p.stderr]) + "\\n")
    sys.stdout.flush()
"""


class Launcher:
    """Starts the measured processes from a small Python started before torch is imported here.

    Linux carries a process's peak RSS into the children it forks and execs (``ru_maxrss`` of a child of this
    ~1 GB process would read ~1 GB whatever it does); forked from this ~10 MB launcher, a worker's
    ``ru_maxrss`` is its own. Workers also report ``VmHWM`` (the peak of their own address space), which
    inheritance cannot touch."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, argv: list[str], cwd: Path) -> tuple[int, str, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([argv, str(cwd)]) + "\n")
        self.proc.stdin.flush()
        code, out, err = json.loads(self.proc.stdout.readline())
        return code, out, err

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_worker(launcher: Launcher, kind: str, bundle_dir: Path, head_dir: Path, images: Path, requests: int) -> dict:
    t = time.perf_counter()
    code, out, err = launcher.run([sys.executable, "-m", "bench.onnx_head", "--worker", kind, "--bundle",
                                   str(bundle_dir), "--head", str(head_dir), "--images", str(images),
                                   "--process-requests", str(requests)], Path(__file__).resolve().parents[1])
    if code != 0:
        raise RuntimeError(f"{kind} worker failed ({code}): {err[-2000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["process_wall_s"] = round(time.perf_counter() - t, 4)
    return res


def _median_runs(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = round(statistics.median(r[k] for r in runs), 4)
    return out


def _pkg_mb(name: str) -> float | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20, 1)


# ---------------------------------------------------------------------------------------------- report


def print_table(report: dict) -> None:
    print(f"\nlatency per request, batch 1, 1 thread, {report['images']} ({report['requests']} requests)")
    print(f"{'config':10} {'measure':8} {'torch p50':>10} {'p95':>8} {'ORT p50':>9} {'p95':>8} {'torch/ORT':>9}")
    for c in report["configs"]:
        lat = c["latency"]
        for k in ("head", "encode", "policy"):
            if f"torch_{k}" not in lat:
                continue
            t, o = lat[f"torch_{k}"], lat[f"ort_{k}"]
            print(f"{c['config']:10} {k:8} {t['p50_ms']:10.3f} {t['p95_ms']:8.3f} {o['p50_ms']:9.3f} "
                  f"{o['p95_ms']:8.3f} {t['p50_ms'] / o['p50_ms']:9.2f}")
        v = lat["view_head"]
        print(f"{c['config']:10} {'view':8} {'':10} {'':8} {v['p50_ms']:9.3f} {v['p95_ms']:8.3f} "
              f"{lat['torch_head']['p50_ms'] / v['p50_ms']:9.2f}   (ONNX head through torch_view)")
        a = c["agreement"]
        payloads = (f", same payloads {a['same_payload']}/{a['requests']} ({c['codec']}), uint8-affine at this "
                    f"split {a['uint8_same_payload']}/{a['requests']}" if c["codec"] else "")
        print(f"{'':10} same decisions {a['same_decision']}/{a['requests']}{payloads}; "
              f"max |split tensor diff| {a['max_abs_diff_split_tensor']:.2g}")
    print("\nfresh processes (median of repeats)")
    print(f"{'config':10} {'process':7} {'import s':>9} {'load s':>7} {'ready s':>8} {'ru_maxrss MB':>13} "
          f"{'VmHWM MB':>9} {'CUDA libs MB':>13} {'p50 ms':>7}")
    for name, procs in report["processes"].items():
        for kind in ("torch", "onnx"):
            p = procs[kind]
            print(f"{name:10} {kind:7} {p['import_s']:9.3f} {p['load_s']:7.3f} {p['ready_s']:8.3f} "
                  f"{p['maxrss_mb']:13.1f} {p['vm_hwm_mb'] or 0:9.1f} {p['rss_cuda_libs_mb'] or 0:13.1f} "
                  f"{p['p50_ms']:7.3f}")
    print(f"python + numpy floor: ru_maxrss {report['numpy_floor_maxrss_mb']} MB, "
          f"VmHWM {report['numpy_floor_vm_hwm_mb']} MB")
    print("\ndisk: " + ", ".join(f"{k} ONNX {v['onnx_mb']} MB vs safetensors {v['bundle_weights_mb']} MB"
                                 for k, v in report["disk"].items()))
    print("installed packages (MB): " + ", ".join(f"{k} {v}" for k, v in report["packages_mb"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="JSON report")
    ap.add_argument("--requests", type=int, default=10000, help="timed requests per configuration (test images)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per kind and configuration")
    ap.add_argument("--process-requests", type=int, default=300, help="requests each fresh process runs")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="where bundles and exports go (default: a temp dir)")
    ap.add_argument("--worker", choices=("torch", "onnx", "numpy"), help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--head", help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.bundle, args.head, args.images, args.process_requests)))
        return 0
    if args.out is None:
        ap.error("--out is required")
    launcher = Launcher()  # before torch: see Launcher
    import torch

    from edge_agent.onnx_head import export_head
    from partitioner.weights import load_default
    from splitinfer.allocator import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-head-")
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    _, staged, heads, _ = load_default()
    thresholds, thr_source = certified_thresholds(staged, heads, args.data_dir)
    images, source = sample_images(args.requests, args.data_dir)
    images_path = work / "images.npy"
    np.save(images_path, images[: max(args.process_requests, 1)])
    report: dict = {"summary": {}, "images": source, "requests": len(images), "thresholds": thresholds,
                    "thresholds_source": thr_source, "configs": [], "processes": {}, "disk": {},
                    "machine": {"python": platform.python_version(), "processor": platform.processor(),
                                "cpus": os.cpu_count(), "torch": torch.__version__}}
    import onnxruntime

    report["machine"]["onnxruntime"] = onnxruntime.__version__
    for name, cfg in CONFIGS.items():
        bdir = default_bundle(work / name / "bundle", cfg["split"], cfg["exits"], cfg["codec"], thresholds)
        hdir = work / name / "onnx"
        t = time.perf_counter()
        manifest = export_head(bdir, out_dir=hdir)
        export_s = time.perf_counter() - t
        print(f"{name}: exported in {export_s:.2f} s, measuring ...", file=sys.stderr)
        res = measure_config(name, bdir, hdir, images)
        res["export_s"] = round(export_s, 3)
        res["export_max_abs_diff"] = max(e.max_abs_diff for e in manifest.entries())
        report["configs"].append(res)
        weights = sum(f.stat().st_size for f in bdir.glob("*.safetensors"))
        report["disk"][name] = {"onnx_mb": round(sum(e.bytes for e in manifest.entries()) / 2**20, 3),
                                "onnx_files": {e.file: e.bytes for e in manifest.entries()},
                                "bundle_weights_mb": round(weights / 2**20, 3)}
        runs: dict[str, list[dict]] = {"torch": [], "onnx": []}
        for _ in range(args.repeats):  # alternating, so page-cache warmth favours neither
            for kind in runs:
                runs[kind].append(run_worker(launcher, kind, bdir, hdir, images_path, args.process_requests))
        report["processes"][name] = {kind: _median_runs(r) for kind, r in runs.items()}
    floor = [run_worker(launcher, "numpy", work / "demo" / "bundle", work / "demo" / "onnx", images_path, 0)
             for _ in range(args.repeats)]
    launcher.close()
    report["numpy_floor_maxrss_mb"] = statistics.median(r["maxrss_mb"] for r in floor)
    report["numpy_floor_vm_hwm_mb"] = statistics.median(r["vm_hwm_mb"] or 0 for r in floor)
    report["packages_mb"] = {k: _pkg_mb(k) for k in ("torch", "nvidia", "triton", "onnxruntime", "numpy", "onnx")}

    demo = report["configs"][0]
    full = report["configs"][1]
    pd, pf = report["processes"]["demo"], report["processes"]["edge_only"]
    report["summary"] = {
        "demo_head_p50_ms": {"torch": demo["latency"]["torch_head"]["p50_ms"],
                             "ort": demo["latency"]["ort_head"]["p50_ms"]},
        "demo_head_speedup_torch_over_ort": demo["ratios"]["head_torch_over_ort_p50"],
        "demo_policy_speedup_torch_over_ort": demo["ratios"]["policy_torch_over_ort_p50"],
        "edge_only_head_p50_ms": {"torch": full["latency"]["torch_head"]["p50_ms"],
                                  "ort": full["latency"]["ort_head"]["p50_ms"]},
        "edge_only_head_speedup_torch_over_ort": full["ratios"]["head_torch_over_ort_p50"],
        "peak_rss_mb": {"torch_process": pd["torch"]["maxrss_mb"], "ort_only_process": pd["onnx"]["maxrss_mb"],
                        "python_numpy_floor": report["numpy_floor_maxrss_mb"],
                        "torch_process_cuda_libs_resident": pd["torch"]["rss_cuda_libs_mb"]},
        "peak_rss_ratio_torch_over_ort": round(pd["torch"]["maxrss_mb"] / pd["onnx"]["maxrss_mb"], 2),
        "import_s": {"torch": pd["torch"]["import_s"], "ort_only": pd["onnx"]["import_s"]},
        "ready_s": {"torch": pd["torch"]["ready_s"], "ort_only": pd["onnx"]["ready_s"]},
        "edge_only_peak_rss_mb": {"torch_process": pf["torch"]["maxrss_mb"],
                                  "ort_only_process": pf["onnx"]["maxrss_mb"]},
        "onnx_disk_mb": {k: v["onnx_mb"] for k, v in report["disk"].items()},
        "same_exit_decisions": {c["config"]: f"{c['agreement']['same_decision']}/{c['agreement']['requests']}"
                                for c in report["configs"]},
        "demo_same_payload_bytes": f"{demo['agreement']['same_payload']}/{demo['agreement']['requests']}",
        "demo_uint8_same_payload_bytes": f"{demo['agreement']['uint8_same_payload']}/{demo['agreement']['requests']}",
        "ort_only_process_imported_torch": pd["onnx"]["torch_imported"],
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out} ({report['summary']['seconds']} s)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
