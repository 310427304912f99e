"""Benchmark: serving a split tail with our cloud server against MLServer, same machine, same load, same run.

``python -m bench.serving --out FILE.json [--quick] [--tails light,heavy] [--configs ...]``

Tails
-----
* ``light``: the embedded default model at its planned split and codec. The bundle is the demo's
  (``runs/demo/bundle`` after ``make demo``) when it loads, else it is planned here exactly as ``splitinfer
  demo`` plans it (5 Mbit/s, 20 ms, raspberry-pi-4, weighted latency+energy, interior splits; ~20 s) into the
  work directory. Its inputs are the first Fashion-MNIST test images.
* ``heavy``: torchvision ResNet-50 with random weights, cut after ``layer2`` (boundary ``[512, 28, 28]``; the
  tail is ``layer3``, ``layer4`` and the classifier), uint8-affine codec. The bundle is planned here with
  ``plan make``'s library (:func:`partitioner.make.make_model_plan`, 3 profiling runs per stage: the plan's own
  choice of split does not matter, the server accepts every split) into the work directory. Its inputs are
  seeded random images.

For each input the edge's work is done once, in this process (head up to the split, the plan's codec:
``payload, meta = codec.encode(head(x))``), and the reference answer is computed in-process
(``TailRuntime.decode_features`` + ``run_tail``). Bundles are reused from the work directory when they load
(``--rebuild`` plans them again).

Servers and configurations (``--configs``, default ``ours-batched,ours-p1,ours-torch,ours-b1,mlserver,mlserver-torch,
mlserver-pw2,triton-python``)
------------------------------------------------------------------------------------------------------------
**Tail engine.** Before a tail's servers start, the bench picks its "best" engine (``--tail-engine auto``, the
default: :func:`cloud_server.tail_engines.choose` at the workload's split with the servers' intra-op threads,
the same measurement the server's ``--tail-engine auto`` makes; or the engine named). Every configuration
marked "best" runs that engine (ours by ``SPLITINFER_CLOUD_TAIL_ENGINE`` and ``_SPLITS``, MLServer's runtime by
its ``extra`` settings, Triton by its model config), so ``ours-batched`` vs ``mlserver`` compares servers, not
engines; ``ours-torch`` and ``mlserver-torch`` run eager torch. The choice, its reason and timings are in
``settings.tails.<tail>.tail_engine``.

* ``ours-batched``: ``splitinfer cloud serve --bundle B --port P --metrics-port 0`` as a subprocess, with
  ``SPLITINFER_CLOUD_TORCH_THREADS``, ``SPLITINFER_CLOUD_WORKERS`` (batches computed at once),
  ``SPLITINFER_CLOUD_BATCH_MAX_SIZE`` / ``SPLITINFER_CLOUD_BATCH_MAX_DELAY_MS`` (dynamic batching) per tail
  (``TAIL_SETTINGS``: light 1 torch thread x 2 workers, heavy 2 torch threads x 1 worker; 32 and 2 ms for
  both; ``--torch-threads`` etc. override them for every tail), ``SPLITINFER_CLOUD_PROCESSES`` (light 2, heavy
  1: server processes sharing the port, :mod:`cloud_server.processes`; the workers are the compute threads in
  total, as MLServer's and Triton's, so light runs 2 processes x 1 worker), and in-flight and
  queue limits above the highest concurrency. Every other ``SPLITINFER_CLOUD_*`` variable of the caller's
  environment is removed.
* ``ours-p1``: ``ours-batched`` in one process (all workers in it); not run where the tail's setting is 1.
* ``ours-torch``: ``ours-batched`` with the eager torch engine.
* ``ours-b1``: the same with ``SPLITINFER_CLOUD_BATCH_MAX_SIZE=1`` (batching off: each request runs alone).
* ``triton-python``: a real Triton Inference Server 2.51 (``nvidia-pytriton`` wheel, ``runs/.venv-triton``)
  serving ``splitinfer cloud export-triton --backend python``'s ensemble (:mod:`cloud_server.triton_python`):
  the edge's own request format, our decode and tail, Triton's dynamic batching (same max batch and delay), one
  instance per step per worker of ours, the same engine and threads. No bar: a comparison.
* ``mlserver-torch``: ``mlserver`` with the eager torch engine.
* ``mlserver``: MLServer 1.7.1 with the custom runtime :mod:`bench.mlserver_runtime` (an ``mlserver.MLModel``
  that loads the same bundle with ``load_bundle`` and runs the same ``TailRuntime`` decode + ``staged.run``),
  adaptive batching on with ``max_batch_size`` and ``max_batch_time`` equal to ours, the same torch threads
  and the same number of threads running batches at once (a thread pool in the runtime, so MLServer's event
  loop stays free, as ours does), ``parallel_workers = 0``: inference in the server process. That is the fair
  setting on a 2-core machine: MLServer's default (1) puts one worker process behind the front process and
  pays an inter-process hop per request (pickled requests through multiprocessing queues) for no extra
  parallelism, as our tail already runs in threads that release the GIL.
* ``mlserver-pw2``: the same with ``parallel_workers = 2`` (two worker processes, one tail thread each: the
  same total compute parallelism), to report MLServer's multi-process mode as well.
* ``mlserver-t2``: as ``mlserver`` but one batch at a time with 2 torch intra-op threads. MLServer's batcher
  takes every queued request (up to ``max_batch_size``) into one batch, so with 1 intra-op thread a closed
  loop of N <= max_batch_size clients keeps a single core busy while the other idles (ours forms batches per
  free worker); this configuration gives MLServer both cores inside its one batch, so the comparison does not
  rest on a setting that suits only our batcher.
* ``mlserver-fp32``: as ``mlserver``, but sent the decoded boundary tensor instead of the codec payload.

MLServer uses its own ``settings.json`` (loopback host, free gRPC and HTTP ports, ``debug`` off so no access
log interceptor, metrics endpoint off, ``grpc_max_message_length`` as ours, gzip off) and
``model-settings.json``; it runs as ``mlserver start DIR`` in a process group that is stopped at the end.

Request formats (all OIP v2 ``ModelInfer`` over gRPC, model name = the bundle's, no id, raw contents)
-----------------------------------------------------------------------------------------------------
* To our server, what the edge sends (built like ``edge_agent.transport.CloudClient.infer_features``, with
  :mod:`splitinfer.protocol.converters`): input ``features``, ``UINT8``, shape ``[payload_bytes]``, the
  payload in ``raw_input_contents[0]``; request parameters ``split`` (int64), ``codec`` (string) and the codec
  meta as ``codec.<key>``.
* To ``mlserver``, ``mlserver-pw2`` and ``mlserver-t2``, the same payload and the same parameters: input ``features``,
  ``BYTES``, shape ``[1]`` (one element: the payload, 4-byte length prefix in raw contents, as OIP's BYTES
  encoding has it), with ``split``, ``codec`` and ``codec.<key>`` as parameters of the input tensor. Why not
  exactly our format: MLServer's adaptive batcher concatenates the inputs of the requests it merges along
  dimension 0 and keeps only one request's request-level parameters, so a variable-length ``UINT8
  [payload_bytes]`` input would be glued into one byte string with no boundaries, and the codec meta of all
  but one request lost. A BYTES element per request keeps the payloads apart, and input-level parameters are
  merged into per-request lists. The runtime then does what our server does: decode each payload on its own
  (same codec code), concatenate, run the tail once. Same wire bytes (+4), same server work: this is the
  comparison the summary is about.
* To ``mlserver-fp32``: input ``features``, ``FP32``, shape ``[1, *boundary]``, the decoded boundary tensor
  (float32, 37.6 kB for light, 1.6 MB for heavy) in raw contents, input parameter ``split``. MLServer's own
  tensor path (it unpacks raw contents into Python lists and its batcher merges lists); the runtime skips
  decoding. Reported to show what a stock numeric-tensor deployment of the tail costs; it is not the
  headline comparison (more bytes, no decode, a different code path).

Load and measurements
---------------------
Every configuration's server of a tail is up at once (an idle server costs nothing); the points run
concurrency by concurrency, each configuration in turn, in an order rotated at every concurrency: this machine
has slower and faster phases (tens of percent, over minutes), and a configuration measured all in one block
could land in one of them. One load-generator process per point (:mod:`bench.loadgen`, grpc.aio, this project's
environment) for every server:
``N`` closed-loop clients (``--concurrency``, default 1, 2, 4, 8, 16, 32, 64), one channel (TCP connection)
each, cycling through the same ``--inputs`` pre-serialized requests; per point a warm-up (at least
``--warmup`` s and until every client has had an answer), then a fixed measurement window (``--duration``);
latency of every request answered in the window; throughput = answers in the window / window. Every answer
is checked (status OK, ``logits`` of shape ``[1, classes]``), and a few per point are compared with the
in-process reference. The load generator shares the 2 cores with the server; its own CPU use and the server
process tree's (``/proc``, MLServer's workers included) are reported per point (``loadgen_cpu_cores``,
``server_cpu_cores``, ``server_cpu_ms_per_request``), and so is the CPU the rest of the machine used during
the window (``other_cpu_cores``; the run warns above 0.25: such points are not clean, run the benchmark on
an otherwise idle machine). One load-generator process is the setting: a second one could not run on a core
of its own here and would only take CPU from the server; where ``loadgen_cpu_cores`` approaches 1, the
client is the limit at that point.

``grpc_overhead_ms_p50`` (per tail): with the ``ours-b1`` server up and idle, ``p50`` of the wall time of
``CloudClient.infer_features`` (the edge's own synchronous client, one request at a time) minus ``p50`` of
the same decode + tail called in this process (``TailRuntime``, same torch threads). Beside it, how much of
that is gRPC and the machine rather than our server: ``grpc_overhead_floor_ms_p50``, the same measurement
against :mod:`bench.grpc_floor` (a bare ``grpc.aio`` generic handler running that decode + tail inline, no
server logic), and ``bare_rpc_ms_p50``, an empty ``ServerReady`` call to the ``ours-b1`` server. The
in-process call and the two servers take turns in chunks of 50 requests, so the machine's slower and faster
phases (they differ by tens of percent here) weigh on all three alike.

Summary (per tail): ``peak_throughput_ratio_vs_mlserver`` (peak over concurrency of ``ours-batched`` /
that of the ``mlserver`` reference, the same engine), ``peak_throughput_ratio_vs_mlserver_torch`` (against
``mlserver-torch``), ``p99_ratio_max_vs_mlserver`` (max over concurrencies of the p99 ratio),
``overhead_above_floor_ms_p50`` (``grpc_overhead_ms_p50 - grpc_overhead_floor_ms_p50``),
``compute_ratio_vs_main_thread`` (p50 of the ``server_compute_ms`` our idle ``ours-b1`` server reports in its
answers / p50 of the same decode + tail on this process's main thread, same engine: the worker-thread penalty),
``triton_served`` (Triton answered every request OK and equal to the reference), ``vs_triton``,
``compute_ceiling_rps`` (what the tail engine alone does here with no server: :func:`compute_ceiling`, measured
before the servers start) and ``peak_fraction_of_ceiling`` per configuration (its peak over that),
``batching_gain_at_32`` (``ours-batched`` / ``ours-b1`` throughput at
32 clients; null when 32 was not measured), ``p99_never_worse_than_mlserver`` (``ours-batched`` p99 <= the
reference's at every concurrency), ``grpc_overhead_ms_p50`` (and ``grpc_overhead_floor_ms_p50``,
``bare_rpc_ms_p50``); the same against the best MLServer configuration
(highest peak throughput; for p99, the lowest p99 of any MLServer configuration at each concurrency) and
against each one; and whether every request got an OK and correct answer.

MLServer's environment
----------------------
MLServer 1.7.1 cannot join this project's environment: ``pip install --dry-run mlserver==1.7.1`` in ``.venv``
wants ``fastapi<0.116``: it would downgrade fastapi 0.165.0 -> 0.115.14 and starlette 1.10.0 -> 0.46.2 under
the edge agent's HTTP API, and add ~36 packages (the bench runs this dry run when it makes the environment and
stores what it would change in ``settings.mlserver.environment``). So the bench creates a separate virtual
environment on first use (``--mlserver-venv``, default ``runs/.venv-mlserver``, ~6 GB, ~2 min): ``python -m
venv``, then one ``pip install`` of ``mlserver==1.7.1`` with ``torch``, ``torchvision``, ``grpcio``,
``protobuf``, ``numpy`` and the tail's few dependencies (``safetensors``, ``constriction``, ``zstandard``,
``pydantic``, ``pydantic-settings``, ``pyyaml``, ``tqdm``) pinned to the versions installed here, so both
servers run the same torch and gRPC builds. (The local CPU wheel of torch 2.13.0 does not serve: PyPI's
torchvision builds need their CUDA torch, and ``import torchvision`` then fails with ``operator
torchvision::nms does not exist``; the ResNet-50 bundle needs torchvision.) ``uvloop`` is pinned to 0.21.0,
the last release before 0.22: from uvloop 0.22 on, MLServer's parallel workers die at start (``There is no
current event loop in thread 'MainThread'``) and are restarted forever. This project is not installed there:
MLServer runs with ``PYTHONPATH`` = this repository, so the runtime imports ``splitinfer`` and
``cloud_server.tail`` from this work tree. A stamp file records the pins; when they change, the environment is
made again.

Run ``--quick`` for a short check (light tail only, 1 and 4 clients, 1 s points: for tests, not for figures).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from splitinfer.daemons import Daemon, free_port

ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (results committed under docs/ name no machine's
    directories), else as given."""
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


MLSERVER_VERSION = "1.7.1"
TAILS = ("light", "heavy")
# Our server's configurations: batching on/off and the tail engine ("best": the one this bench measured fastest
# for the tail, see tail_engine_for; "torch": eager).
# "processes": None is the tail's setting (TAIL_SETTINGS); "ours-p1" is ours-batched in one process (skipped where
# the tail's setting is already 1).
OURS = {"ours-batched": {"batched": True, "engine": "best", "processes": None},
        "ours-p1": {"batched": True, "engine": "best", "processes": 1},
        "ours-torch": {"batched": True, "engine": "torch", "processes": None},
        "ours-b1": {"batched": False, "engine": "best", "processes": None}}
# MLServer configurations: request format, parallel_workers, torch intra-op threads / batch threads per
# process (None: the same as ours) and the tail engine (as ours).
MLSERVER_CONFIGS = {
    "mlserver": {"format": "bytes", "parallel_workers": 0, "torch_threads": None, "workers": None, "engine": "best"},
    "mlserver-torch": {"format": "bytes", "parallel_workers": 0, "torch_threads": None, "workers": None,
                       "engine": "torch"},
    "mlserver-pw2": {"format": "bytes", "parallel_workers": 2, "torch_threads": None, "workers": None,
                     "engine": "best"},
    "mlserver-t2": {"format": "bytes", "parallel_workers": 0, "torch_threads": 2, "workers": 1, "engine": "best"},
    "mlserver-fp32": {"format": "fp32", "parallel_workers": 0, "torch_threads": None, "workers": None,
                      "engine": "best"},
}
TRITON = ("triton-python",)  # a real Triton 2.51 running our export-triton --backend python ensemble
CONFIGS = (*OURS, *MLSERVER_CONFIGS, *TRITON)
DEFAULT_CONFIGS = ("ours-batched", "ours-p1", "ours-torch", "ours-b1", "mlserver", "mlserver-torch", "mlserver-pw2",
                   "triton-python")
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
QUICK_CONCURRENCY = (1, 4)
# measurement window and warm-up per point (seconds); the heavy tail answers ~30 requests/s on 2 cores
DURATION_S = {"light": 10.0, "heavy": 15.0}
WARMUP_S = {"light": 2.0, "heavy": 5.0}
OVERHEAD_REQUESTS = {"light": 2000, "heavy": 40}
HEAVY_MODEL = "resnet50"
HEAVY_AFTER = "layer2"  # cut after this torchvision block
VENV_PINS = ("torch", "torchvision", "grpcio", "protobuf", "numpy", "safetensors", "constriction", "zstandard",
             "pydantic", "pydantic-settings", "pyyaml", "tqdm", "onnx", "onnxruntime")
# MLServer 1.7.1's parallel workers call asyncio.get_event_loop() before any loop runs; uvloop 0.22's policy raises
# there ("There is no current event loop in thread 'MainThread'") and the workers die and restart forever, so the
# environment gets the last uvloop before that change.
MLSERVER_EXTRA_PINS = ("uvloop==0.21.0",)
STAMP = ".splitinfer-bench-serving.json"
REQUEST_TIMEOUT_S = 120.0


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    git = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip())
    return {"node": platform.node(), "cpu": cpu, "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gib": mem_gib, "kernel": platform.release(), "python": platform.python_version(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "torch": torch.__version__, "grpcio": metadata.version("grpcio"), "git": git}


# ----------------------------------------------------------------------------------- MLServer's environment


def _pins() -> list[str]:
    return ([f"mlserver=={MLSERVER_VERSION}", *MLSERVER_EXTRA_PINS]
            + [f"{name}=={metadata.version(name)}" for name in VENV_PINS])


def dry_run_conflicts() -> dict:
    """What ``pip install --dry-run mlserver==X`` would change in this environment (packages it would replace)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                               str(report), f"mlserver=={MLSERVER_VERSION}"], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0 or not report.exists():
            return {"error": (proc.stderr or proc.stdout)[-2000:]}
        items = json.loads(report.read_text()).get("install", [])
    changed, added = {}, []
    for item in items:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            added.append(f"{name}=={version}")
            continue
        if have != version:
            changed[name] = f"{have} -> {version}"
    return {"would_change": changed, "would_add": len(added)}


def ensure_mlserver_venv(path: Path) -> dict:
    """Create (or reuse) MLServer's virtual environment; returns its stamp (pins, versions, dry-run result)."""
    pins = _pins()
    stamp_file = path / STAMP
    if stamp_file.exists():
        stamp = json.loads(stamp_file.read_text())
        if stamp.get("pins") == pins and (path / "bin" / "mlserver").exists():
            return stamp
        _log(f"MLServer environment {path} was made for other pins; making it again")
    if path.exists():
        if not (path / "pyvenv.cfg").exists():
            raise RuntimeError(f"{path} exists and is not a virtual environment; choose another --mlserver-venv")
        shutil.rmtree(path)
    _log(f"checking whether mlserver=={MLSERVER_VERSION} fits this environment (pip --dry-run) ...")
    conflicts = dry_run_conflicts()
    _log(f"  it would change: {conflicts.get('would_change')}; making a separate environment at {path} "
         "(~2 min, ~6 GB)")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    log = path / "pip-install.log"
    with open(log, "w") as f:
        proc = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", *pins], stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"installing MLServer failed (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    versions = json.loads(subprocess.run(
        [str(path / "bin" / "python"), "-c", "import json, importlib.metadata as m; print(json.dumps({n: "
         f"m.version(n) for n in {['mlserver', *VENV_PINS, 'fastapi', 'starlette', 'uvloop']!r}}}))"],
        capture_output=True, text=True, check=True).stdout)
    stamp = {"pins": pins, "versions": versions, "dry_run_in_project_venv": conflicts,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    stamp_file.write_text(json.dumps(stamp, indent=1))
    return stamp


# ------------------------------------------------------------------------------------------------ bundles


def bundle_loads(path: Path, model: str) -> bool:
    """Whether ``path`` holds a bundle of ``model`` that loads (a failure is logged)."""
    from splitinfer.bundle import load_bundle

    if not (path / "plan.json").exists():
        return False
    try:
        return load_bundle(path).plan.model.name == model
    except Exception as exc:  # noqa: BLE001 - any failure means: build a fresh one
        _log(f"bundle {path} does not load ({type(exc).__name__}: {exc}); planning a new one")
        return False


def light_bundle(workdir: Path, rebuild: bool) -> tuple[Path, str]:
    """The default model's bundle as ``splitinfer demo`` plans it: the demo's own, a cached one, or a new one."""
    out = workdir / "light" / "bundle"
    if not rebuild:
        for cand, how in ((ROOT / "runs" / "demo" / "bundle", "the demo's bundle"), (out, "cached")):
            if bundle_loads(cand, "default"):
                return cand, how
    from partitioner.cost import Link, parse_bandwidth, parse_duration
    from partitioner.make import make_default_plan
    from partitioner.search import Objective
    from splitinfer.cli import demo
    from splitinfer.energy import get_profile

    _log("planning the default model as the demo does (~20 s) ...")
    dev = get_profile(demo.DEMO_DEVICE)
    make_default_plan(out, Link(parse_bandwidth(demo.DEMO_BANDWIDTH), parse_duration(demo.DEMO_RTT)), dev,
                      dev.compute_slowdown, splits="interior", objective=Objective.parse(*demo.DEMO_OBJECTIVE))
    return out, "planned here like the demo"


def heavy_bundle(workdir: Path, rebuild: bool) -> tuple[Path, str]:
    """A ResNet-50 (random weights) bundle made by ``plan make``'s library."""
    out = workdir / "heavy" / "bundle"
    if not rebuild and bundle_loads(out, HEAVY_MODEL):
        return out, "cached"
    from partitioner.cost import Link
    from partitioner.make import PlanOptions, make_model_plan
    from partitioner.target import load_target

    _log(f"planning {HEAVY_MODEL} (random weights, 3 profiling runs per stage) ...")
    make_model_plan(out, load_target(HEAVY_MODEL), PlanOptions(link=Link(10e6, 0.05), repeats=3))
    return out, "planned here (make_model_plan)"


# ----------------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """One tail: its bundle, split and codec, the edge's payloads and the serialized requests per format."""

    tail: str
    bundle: Path
    bundle_source: str
    model_name: str
    split: int
    codec: str
    boundary_shape: list[int]
    num_classes: int
    payloads: list[bytes]
    metas: list[dict]
    decoded: list[np.ndarray]
    reference: list[np.ndarray]
    requests: dict[str, list[bytes]] = field(default_factory=dict)  # format -> serialized ModelInferRequests

    def describe(self) -> dict:
        sizes = [len(p) for p in self.payloads]
        return {"bundle": repo_path(self.bundle), "bundle_source": self.bundle_source, "model": self.model_name,
                "split": self.split, "codec": self.codec, "boundary_shape": self.boundary_shape,
                "boundary_fp32_bytes": 4 * int(np.prod(self.boundary_shape)), "inputs": len(self.payloads),
                "payload_bytes_mean": round(statistics.fmean(sizes), 1), "payload_bytes_max": max(sizes),
                "codec_meta_example": {k: str(v) for k, v in self.metas[0].items()},
                "request_bytes_mean": {fmt: round(statistics.fmean(len(b) for b in blobs), 1)
                                       for fmt, blobs in self.requests.items()}}


def _inputs(tail: str, bundle, n: int) -> torch.Tensor:
    if tail == "light":
        from splitinfer.data import load_fashion_mnist, to_model_input

        test = load_fashion_mnist("test")
        return to_model_input(test.images[:n], bundle.plan.input.mean, bundle.plan.input.std)
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *bundle.plan.input.shape, generator=g)


def heavy_split(plan) -> int:
    """The last boundary inside ``HEAVY_AFTER`` (torchvision names: ``layer2_3_relu_2`` for ResNet-50)."""
    inside = [b.index for b in plan.boundaries if b.node.startswith(HEAVY_AFTER + "_")]
    if not inside:
        raise RuntimeError(f"no boundary named {HEAVY_AFTER}_* in {plan.model.name}'s plan")
    return max(inside)


def make_workload(tail: str, path: Path, source: str, n_inputs: int) -> Workload:
    from cloud_server.tail import TailRuntime
    from splitinfer.bundle import load_bundle

    bundle = load_bundle(path)
    plan = bundle.plan
    split = plan.split if tail == "light" else heavy_split(plan)
    codec_name = plan.codec.name
    if not 0 < split < bundle.num_stages:
        raise RuntimeError(f"{tail}: the plan's split {split} leaves no tail to serve (0 < split < "
                           f"{bundle.num_stages} needed)")
    runtime = TailRuntime(bundle)
    codec = bundle.codec_for(codec_name, split)
    head = bundle.edge_head()
    x = _inputs(tail, bundle, n_inputs)
    payloads, metas, decoded, refs = [], [], [], []
    with torch.inference_mode():
        for i in range(x.shape[0]):
            h = head.run(x[i : i + 1], 0, split)
            payload, meta = codec.encode(h)
            dec = runtime.decode_features(payload, codec_name, meta, split)
            payloads.append(payload)
            metas.append(dict(meta))
            decoded.append(dec.numpy().astype(np.float32))
            refs.append(runtime.run_tail(dec, split))
    w = Workload(tail, path, source, plan.model.name, split, codec_name, runtime.boundary_shape(split),
                 runtime.num_classes, payloads, metas, decoded, refs)
    w.requests = {fmt: [build_request(w, i, fmt) for i in range(len(payloads))] for fmt in ("ours", "bytes", "fp32")}
    return w


def build_request(w: Workload, i: int, fmt: str) -> bytes:
    """One serialized ModelInferRequest in format ``ours`` (what the edge sends), ``bytes`` or ``fp32`` (MLServer)."""
    import struct

    from splitinfer import wire
    from splitinfer.protocol import converters
    from splitinfer.protocol import grpc_service_pb2 as pb

    params: dict[str, object] = {wire.PARAM_SPLIT: int(w.split), wire.PARAM_CODEC: w.codec}
    params.update({wire.CODEC_META_PREFIX + k: v for k, v in w.metas[i].items()})
    if fmt == "ours":  # exactly CloudClient.infer_features
        tensor = converters.InferTensor(wire.FEATURES_TENSOR, "UINT8", np.frombuffer(w.payloads[i], dtype=np.uint8))
        msg = converters.request_to_proto(converters.InferRequest(model_name=w.model_name, id="",
                                                                  parameters=params, inputs=[tensor]))
        return msg.SerializeToString()
    msg = pb.ModelInferRequest(model_name=w.model_name)
    if fmt == "bytes":
        inp = msg.inputs.add(name=wire.FEATURES_TENSOR, datatype="BYTES", shape=[1])
        converters.dict_to_parameters(params, inp.parameters)
        msg.raw_input_contents.append(struct.pack("<I", len(w.payloads[i])) + w.payloads[i])
    elif fmt == "fp32":
        arr = w.decoded[i]
        inp = msg.inputs.add(name=wire.FEATURES_TENSOR, datatype="FP32", shape=list(arr.shape))
        converters.dict_to_parameters({wire.PARAM_SPLIT: int(w.split)}, inp.parameters)
        msg.raw_input_contents.append(arr.astype("<f4").tobytes())
    else:
        raise ValueError(fmt)
    return msg.SerializeToString()


# ------------------------------------------------------------------------------------------------ servers


# Server settings per tail, given alike to our server and to MLServer (see the module docstring). The light tail
# is Python-bound: two worker threads overlap one batch's decoding with another's tail. The heavy tail is
# compute-bound: one batch at a time on both cores (2 intra-op threads) keeps every queued request in the next
# batch; with 2 workers x 1 thread, the queue split into two cohorts of unequal batches and p99 suffered.
TAIL_SETTINGS = {
    "light": {"torch_threads": 1, "workers": 2, "batch_max_size": 32, "batch_max_delay_ms": 2.0, "processes": 2},
    "heavy": {"torch_threads": 2, "workers": 1, "batch_max_size": 32, "batch_max_delay_ms": 2.0},
}


@dataclass
class Settings:
    """What every server is given (ours by environment, MLServer by its settings files)."""

    torch_threads: int
    workers: int
    batch_max_size: int
    batch_max_delay_ms: float
    max_batch: int = 64
    max_message_bytes: int = 16 * 1024 * 1024
    gil_switch_interval_ms: float | None = None  # sys.setswitchinterval in the server process (None: Python's 5 ms)
    inline_compute_max_ms: float | None = None  # ours only (a scheduling feature of our server); None: its default
    processes: int = 1  # ours only: server processes sharing the port; each runs workers // processes threads
    tail_engine: str = "torch"  # the "best" engine of this tail (tail_engine_for), given to every server alike
    tail_engine_split: int | None = None  # the split the engine is built for (the workload's)


class Server(Daemon):
    """A server subprocess in its own process group (stopped as a group), serving on ``port``."""

    def __init__(self, name: str, args: list[str], env: dict, log_path: Path, cwd: Path, port: int):
        super().__init__(args, name=name, log_path=log_path, env=env, cwd=cwd, new_session=True)
        self.port = port


def engine_of(s: Settings, which: str) -> str:
    """A configuration's engine: "best" is the tail's measured best (``s.tail_engine``)."""
    return s.tail_engine if which == "best" else which


def our_env(s: Settings, batched: bool, max_concurrency: int, engine: str = "best",
            processes: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITINFER_CLOUD_")}
    procs = s.processes if processes is None else processes
    env.update({
        "PYTHONPATH": str(ROOT),
        "SPLITINFER_CLOUD_TORCH_THREADS": str(s.torch_threads),
        # s.workers is the compute threads in total (as MLServer's and Triton's): split over the processes
        "SPLITINFER_CLOUD_WORKERS": str(max(1, s.workers // procs)),
        "SPLITINFER_CLOUD_BATCH_MAX_SIZE": str(s.batch_max_size if batched else 1),
        "SPLITINFER_CLOUD_BATCH_MAX_DELAY_MS": str(s.batch_max_delay_ms),
        "SPLITINFER_CLOUD_MAX_INFLIGHT": str(max(512, 4 * max_concurrency)),
        "SPLITINFER_CLOUD_BATCH_MAX_QUEUE": str(max(256, 4 * max_concurrency)),
        "SPLITINFER_CLOUD_MAX_REQUEST_BATCH": str(s.max_batch),
        "SPLITINFER_CLOUD_MAX_MESSAGE_BYTES": str(s.max_message_bytes),
        "SPLITINFER_CLOUD_LOG_LEVEL": "warning",
        "SPLITINFER_CLOUD_TAIL_ENGINE": engine_of(s, engine),
        "SPLITINFER_CLOUD_PROCESSES": str(procs),
    })
    if s.tail_engine_split is not None:
        env["SPLITINFER_CLOUD_TAIL_ENGINE_SPLITS"] = json.dumps([s.tail_engine_split])
    if s.gil_switch_interval_ms is not None:
        env["SPLITINFER_CLOUD_GIL_SWITCH_INTERVAL_MS"] = str(s.gil_switch_interval_ms)
    if s.inline_compute_max_ms is not None:
        env["SPLITINFER_CLOUD_INLINE_COMPUTE_MAX_MS"] = str(s.inline_compute_max_ms)
    return env


def launch(name: str, args: list[str], env: dict, log_path: Path, cwd: Path, port: int, model: str,
           timeout: float = 180.0) -> Server:
    """Start a server process and wait until ``model`` is ready on ``port``; stopped again if it never is."""
    srv = Server(name, args, env, log_path, cwd, port)
    try:
        srv.wait_grpc_ready(f"127.0.0.1:{port}", model=model, timeout=timeout)
    except BaseException:
        srv.stop()
        raise
    return srv


def start_ours(w: Workload, s: Settings, config: str, max_concurrency: int, logdir: Path) -> Server:
    port = free_port()
    cfg = OURS[config]
    return launch("splitinfer cloud serve",
                  [sys.executable, "-m", "splitinfer", "cloud", "serve", "--bundle", str(w.bundle.resolve()), "--host",
                   "127.0.0.1", "--port", str(port), "--metrics-port", "0"],
                  our_env(s, cfg["batched"], max_concurrency, cfg["engine"], cfg["processes"]),
                  logdir / f"{w.tail}-{config}.log", ROOT, port, w.model_name)


def start_triton(w: Workload, s: Settings, logdir: Path) -> tuple[Server, dict]:
    """Our ``export-triton --backend python`` ensemble in a real ``tritonserver`` (the same tail engine, torch
    threads, batch size and delay; one model instance per worker of ours)."""
    from cloud_server.triton_python import prepare_triton, start_tritonserver, write_python_repository

    install = prepare_triton(ROOT / "runs" / ".venv-triton", log=_log)
    repo = write_python_repository(
        w.bundle, logdir / "triton" / w.tail, max_batch=s.batch_max_size,
        max_delay_us=int(s.batch_max_delay_ms * 1000), torch_threads=s.torch_threads, tail_engine=s.tail_engine,
        instances=s.workers, max_request_batch=s.max_batch,
        engine_splits=None if s.tail_engine_split is None else [s.tail_engine_split], force=True)
    port = free_port()
    daemon = start_tritonserver(install, repo.root, port, logdir / f"{w.tail}-triton-python.log", model=w.model_name,
                                timeout=180.0)
    daemon.port = port  # what run_loadgen needs of a Server
    return daemon, {"repository": repo_path(repo.root), "tritonserver": "2.51 (nvidia-pytriton 0.7.0)",
                    "instances_per_step": s.workers, "tail_engine": s.tail_engine}


def mlserver_files(w: Workload, s: Settings, cfg: dict, root: Path) -> tuple[int, dict, dict]:
    """Write ``settings.json`` and ``<model>/model-settings.json`` under ``root``; returns the gRPC port."""
    parallel_workers = cfg["parallel_workers"]
    torch_threads = cfg["torch_threads"] or s.torch_threads
    workers = cfg["workers"] or s.workers
    grpc_port = free_port()
    settings = {"debug": False, "parallel_workers": parallel_workers, "host": "127.0.0.1",
                "http_port": free_port(), "grpc_port": grpc_port, "metrics_endpoint": None,
                "metrics_port": free_port(), "grpc_max_message_length": s.max_message_bytes,
                "gzip_enabled": False, "load_models_at_startup": True}
    # Threads running batches at once, in total as ours: split over the worker processes when there are any.
    threads_per_process = max(1, workers // parallel_workers) if parallel_workers else workers
    model = {"name": w.model_name, "implementation": "bench.mlserver_runtime.SplitTailModel",
             "max_batch_size": s.batch_max_size, "max_batch_time": s.batch_max_delay_ms / 1e3,
             "parameters": {"version": "1", "extra": {"bundle": str(w.bundle.resolve()),
                                                      "torch_threads": torch_threads,
                                                      "tail_engine": engine_of(s, cfg["engine"]),
                                                      "tail_engine_splits": None if s.tail_engine_split is None
                                                      else [s.tail_engine_split],
                                                      "gil_switch_interval_ms": s.gil_switch_interval_ms,
                                                      "workers": threads_per_process, "max_batch": s.max_batch}}}
    if root.exists():
        shutil.rmtree(root)
    (root / w.model_name).mkdir(parents=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=1))
    (root / w.model_name / "model-settings.json").write_text(json.dumps(model, indent=1))
    return grpc_port, settings, model


def start_mlserver(w: Workload, s: Settings, venv: Path, cfg: dict, root: Path, logdir: Path,
                   label: str) -> tuple[Server, dict]:
    venv = venv.resolve()
    port, settings, model = mlserver_files(w, s, cfg, root)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLSERVER_", "SPLITINFER_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update({"PYTHONPATH": str(ROOT), "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"})
    srv = launch("mlserver", [str(venv / "bin" / "mlserver"), "start", str(root)], env,
                 logdir / f"{w.tail}-{label}.log", root, port, w.model_name)
    return srv, {"settings.json": settings, "model-settings.json": model}


# ------------------------------------------------------------------------------------------------ running


def run_loadgen(w: Workload, fmt: str, srv: Server, concurrency: list[int], warmup_s: float, duration_s: float,
                workdir: Path, label: str) -> dict:
    from bench.loadgen import write_requests

    req_file = workdir / f"{w.tail}-{fmt}.requests"
    write_requests(req_file, w.requests[fmt])
    spec = {"target": f"127.0.0.1:{srv.port}", "requests": str(req_file),
            "expect": {"output": "logits", "shape": [1, w.num_classes]},
            "points": [{"concurrency": c, "warmup_s": warmup_s, "duration_s": duration_s} for c in concurrency],
            "timeout_s": REQUEST_TIMEOUT_S, "channels": "per-client", "server_pid": srv.pid, "keep_samples": 3}
    spec_file = workdir / f"{w.tail}-{label}.spec.json"
    out_file = workdir / f"{w.tail}-{label}.loadgen.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    budget = len(concurrency) * (warmup_s + duration_s + REQUEST_TIMEOUT_S + 30) + 60
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.loadgen", "--spec", str(spec_file), "--out", str(out_file)],
                          cwd=ROOT, env=env, timeout=budget)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed (exit {proc.returncode}) against {label}")
    return json.loads(out_file.read_text())


def samples_match(w: Workload, samples: list) -> bool:
    """The kept answers equal the in-process reference (batched float sums may differ in the last bits)."""
    for idx, hexed in samples:
        got = np.frombuffer(bytes.fromhex(hexed), dtype="<f4")
        ref = w.reference[idx].ravel()
        if got.shape != ref.shape or float(np.abs(got - ref).max()) > 1e-3 * max(1.0, float(np.abs(ref).max())):
            return False
    return True


OVERHEAD_CHUNK = 50  # requests per chunk; the in-process call and each server take turns chunk by chunk


def grpc_overhead(w: Workload, ports: dict[str, int], n: int, engine: str = "torch") -> dict[str, dict]:
    """Per server (``name -> port``, each idle): p50 of a full round trip minus p50 of the same decode + tail in
    this process. The in-process calls and the servers take turns in chunks of ``OVERHEAD_CHUNK`` requests (the
    order reversed every other chunk), so a slower or faster phase of the machine affects all alike."""
    from cloud_server.tail import TailRuntime
    from edge_agent.transport import CloudClient
    from splitinfer.bundle import load_bundle

    runtime = TailRuntime(load_bundle(w.bundle), engine=engine, engine_splits=[w.split])  # as the servers run it
    k = len(w.payloads)
    compute: dict[str, list[float]] = {name: [] for name in ports}  # server_compute_ms of each answer
    warm = max(3, min(50, n // 10))
    clients = {name: CloudClient(f"127.0.0.1:{port}", w.model_name, timeout_s=REQUEST_TIMEOUT_S)
               for name, port in ports.items()}

    def inproc(i: int) -> None:
        x = runtime.decode_features(w.payloads[i % k], w.codec, w.metas[i % k], w.split)
        runtime.run_tail(x, w.split)

    def remote(name: str):
        def call(i: int) -> None:
            res = clients[name].infer_features(w.payloads[i % k], w.metas[i % k], w.split, w.codec)
            if res.logits.shape != (1, w.num_classes):
                raise RuntimeError(f"bad answer shape {res.logits.shape} from {name}")
            compute[name].append(res.server_compute_ms)
        return call

    calls = {"in-process": inproc, **{name: remote(name) for name in ports}}
    times: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for call in calls.values():
            for i in range(warm):
                call(i)
        order = list(calls)
        for chunk in range(max(1, -(-n // OVERHEAD_CHUNK))):
            for name in order if chunk % 2 == 0 else order[::-1]:
                for i in range(chunk * OVERHEAD_CHUNK, min(n, (chunk + 1) * OVERHEAD_CHUNK)):
                    t0 = time.perf_counter()
                    calls[name](i)
                    times[name].append(time.perf_counter() - t0)
        bare = {name: [clients[name].probe_rtt() for _ in range(warm + min(n, 500))][warm:] for name in ports}
    finally:
        for client in clients.values():
            client.close()
    local = times["in-process"]
    in_p50 = statistics.median(local) * 1e3
    out = {}
    for name in ports:
        rt_p50 = statistics.median(times[name]) * 1e3
        served = compute[name][-len(times[name]):]  # the timed calls' (warm-up calls dropped)
        server_compute_p50 = statistics.median(served) if served and max(served) > 0 else None
        out[name] = {
            "requests": n, "in_process_ms_p50": round(in_p50, 4), "round_trip_ms_p50": round(rt_p50, 4),
            "server_compute_ms_p50": None if server_compute_p50 is None else round(server_compute_p50, 4),
            "compute_ratio_vs_main_thread": None if server_compute_p50 is None else round(server_compute_p50 / in_p50,
                                                                                          4),
            "in_process": f"TailRuntime decode + run_tail on this process's main thread, tail engine {engine}",
            "grpc_overhead_ms_p50": round(rt_p50 - in_p50, 4),
            "in_process_ms_p99": round(float(np.percentile(local, 99)) * 1e3, 4),
            "round_trip_ms_p99": round(float(np.percentile(times[name], 99)) * 1e3, 4),
            "bare_rpc_ms_p50": round(statistics.median(bare[name]) * 1e3, 4),
            "client": "edge_agent.transport.CloudClient (synchronous), one request at a time, server idle; "
                      f"in-process and {', '.join(ports)} in alternating chunks of {OVERHEAD_CHUNK}"}
    return out


CEILING_BATCHES = (1, 8, 16, 32)
CEILING_ROUNDS = 3


def compute_ceiling(w: Workload, s: Settings, quick: bool = False) -> dict:
    """What the tail engine alone can do here, with no server: the workload's decoded features stacked to each
    batch size in :data:`CEILING_BATCHES` (up to the servers' max batch), ``TailRuntime.run_tail`` in this
    process with the servers' engine and intra-op threads, the batch sizes in round-robin rounds, the median
    per size; ``ceiling_rps`` = the best samples per second over the sizes x ``processes`` (each process of our
    server runs its own engine; with more than one process that is an upper bound, not a measurement). Every
    server's peak throughput is reported as a fraction of it: how much is left to win by serving."""
    from cloud_server.tail import TailRuntime
    from splitinfer.bundle import load_bundle

    runtime = TailRuntime(load_bundle(w.bundle), engine=s.tail_engine, threads=s.torch_threads,
                          engine_splits=[w.split])
    one = torch.cat([runtime.decode_features(w.payloads[i], w.codec, w.metas[i], w.split)
                     for i in range(len(w.payloads))])
    sizes = [b for b in CEILING_BATCHES if b <= s.batch_max_size][: 2 if quick else None]
    batches = {b: one.repeat(-(-b // len(one)), *([1] * (one.dim() - 1)))[:b] for b in sizes}
    threads = torch.get_num_threads()
    torch.set_num_threads(s.torch_threads)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    try:
        for b in sizes:
            runtime.run_tail(batches[b], w.split)  # warm-up (first run at a shape)
        for _ in range(1 if quick else CEILING_ROUNDS):
            for b in sizes:
                for _ in range(max(2, 32 // b)):
                    t0 = time.perf_counter()
                    runtime.run_tail(batches[b], w.split)
                    times[b].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    ms = {b: statistics.median(v) * 1e3 for b, v in times.items()}
    rps = {b: 1e3 * b / m for b, m in ms.items()}
    best = max(rps, key=rps.get)
    return {"batch_ms_median": {str(b): round(m, 3) for b, m in ms.items()},
            "samples_per_s": {str(b): round(r, 2) for b, r in rps.items()},
            "best_batch": best, "processes": s.processes, "ceiling_rps": round(rps[best] * s.processes, 2),
            "engine": s.tail_engine, "threads": s.torch_threads,
            "how": "TailRuntime.run_tail on decoded features in the bench process, no server; round-robin batch "
                   "sizes, medians; x processes"}


def start_floor(w: Workload, s: Settings, logdir: Path) -> Server:
    """``bench.grpc_floor``: a bare grpc.aio server running the same decode + tail inline (no server logic)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return launch("bench.grpc_floor", [sys.executable, "-m", "bench.grpc_floor", "--bundle", str(w.bundle.resolve()),
                                       "--port", str(port), "--torch-threads", str(s.torch_threads),
                                       "--tail-engine", s.tail_engine,
                                       *(["--engine-split", str(s.tail_engine_split)]
                                         if s.tail_engine_split is not None else [])],
                  env, logdir / f"{w.tail}-grpc-floor.log", ROOT, port, w.model_name)


def measure_overhead(w: Workload, s: Settings, port: int, n: int, workdir: Path,
                     engine: str = "torch") -> tuple[dict, dict | None]:
    """:func:`grpc_overhead` of our idle server at ``port`` and, side by side, of :func:`start_floor`'s server
    (None, logged, if that one fails to start)."""
    try:
        floor = start_floor(w, s, workdir)
    except Exception as exc:  # noqa: BLE001 - a missing floor leaves its figure null, not the run failed
        _log(f"{w.tail}: gRPC floor server failed: {type(exc).__name__}: {exc}")
        floor = None
    try:
        result = grpc_overhead(w, {"ours": port, **({"floor": floor.port} if floor else {})}, n, engine)
    finally:
        if floor is not None:
            floor.stop()
    ours, bare = result["ours"], result.get("floor")
    if bare is not None:
        bare["server"] = "bench.grpc_floor: bare grpc.aio generic handler, decode + tail inline, nothing else"
    _log(f"{w.tail}: in-process p50 {ours['in_process_ms_p50']:.3f} ms, round trip p50 {ours['round_trip_ms_p50']:.3f}"
         f" ms" + (f"; floor server {bare['round_trip_ms_p50']:.3f} ms" if bare else ""))
    return ours, bare


def tail_engine_for(w: Workload, s: Settings, mode: str) -> tuple[Settings, dict]:
    """The tail's "best" engine: ``mode``, or for ``auto`` the fastest that agrees with torch, measured here at the
    workload's split with the servers' intra-op threads (:func:`cloud_server.tail_engines.choose`). Every server
    configuration whose engine is "best" then runs that one (the same engine in ours, MLServer and Triton)."""
    from cloud_server.tail_engines import choose
    from splitinfer.bundle import load_bundle

    choice = choose(mode, load_bundle(w.bundle).staged, w.split, w.boundary_shape, s.torch_threads)
    _log(f"{w.tail}: tail engine {choice.engine.name}: {choice.reason}")
    return (dataclasses.replace(s, tail_engine=choice.engine.name, tail_engine_split=w.split),
            {"engine": choice.engine.name, "reason": choice.reason, "timings_ms": choice.timings_ms,
             "refused": choice.refused, "split": w.split})


def config_format(config: str) -> str:
    return "ours" if config in OURS or config in TRITON else MLSERVER_CONFIGS[config]["format"]


def server_kind(config: str) -> str:
    return "splitinfer" if config in OURS else "triton" if config in TRITON else "mlserver"


def _row(w: Workload, config: str, p: dict) -> dict:
    lat = p["latency_ms"]
    if (p.get("other_cpu_cores") or 0.0) > 0.25:
        _log(f"warning: {w.tail} {config} c={p['concurrency']}: other processes used "
             f"{p['other_cpu_cores']:.2f} cores during the window")
    return {
        "tail": w.tail, "config": config, "server": server_kind(config),
        "format": config_format(config), "concurrency": p["concurrency"],
        "throughput_rps": p["throughput_rps"], "p50_ms": lat["p50"], "p90_ms": lat["p90"],
        "p99_ms": lat["p99"], "mean_ms": lat["mean"], "max_ms": lat["max"],
        "requests_in_window": p["requests_in_window"], "sent": p["sent"], "ok": p["ok"],
        "errors": p["errors"], "all_ok": not p["errors"] and p["ok"] == p["sent"],
        "answers_match_reference": samples_match(w, p["samples"]), "samples_checked": len(p["samples"]),
        "server_cpu_cores": p.get("server_cpu_cores"),
        "server_cpu_ms_per_request": p.get("server_cpu_ms_per_request"),
        "loadgen_cpu_cores": p["loadgen_cpu_cores"], "other_cpu_cores": p.get("other_cpu_cores"),
        "warmup_s": p["warmup_s"], "window_s": p["window_s"], "drain_s": p["drain_s"]}


def run_tail(w: Workload, configs: list[str], s: Settings, concurrency: list[int], warmup_s: float,
             duration_s: float, overhead_n: int, venv: Path | None, workdir: Path) -> tuple[list[dict], dict, dict]:
    """Every configuration's server is up for the whole tail (an idle one costs nothing); the points run
    concurrency by concurrency, the configurations in an order rotated at each concurrency, so a slower or
    faster phase of the machine (tens of percent here, over minutes) does not fall on one configuration."""
    failures: dict[str, str] = {}
    details: dict = {"mlserver_files": {}}
    servers: dict[str, Server] = {}
    points: dict[str, list[dict]] = {c: [] for c in configs}
    try:
        for config in configs:
            if config in OURS and OURS[config]["processes"] == s.processes and config != "ours-batched" \
                    and OURS[config] == {**OURS["ours-batched"], "processes": s.processes}:
                _log(f"{w.tail}: {config} is ours-batched here (processes {s.processes}); not run twice")
                continue
            _log(f"{w.tail}: starting {config} ...")
            try:
                if config in OURS:
                    servers[config] = start_ours(w, s, config, max(concurrency), workdir)
                elif config in TRITON:
                    servers[config], details["triton"] = start_triton(w, s, workdir)
                else:
                    if venv is None:
                        raise RuntimeError("no MLServer environment")
                    servers[config], details["mlserver_files"][config] = start_mlserver(
                        w, s, venv, MLSERVER_CONFIGS[config], workdir / "mlserver" / f"{w.tail}-{config}", workdir,
                        config)
            except Exception as exc:  # noqa: BLE001 - record, go on with the other configurations
                failures[config] = f"{type(exc).__name__}: {exc}"
                _log(f"{w.tail}: {config} FAILED to start: {failures[config][:2000]}")
        if "ours-b1" in servers and overhead_n:
            try:
                details["grpc_overhead"], details["grpc_overhead_floor"] = measure_overhead(
                    w, s, servers["ours-b1"].port, overhead_n, workdir, engine_of(s, OURS["ours-b1"]["engine"]))
            except Exception as exc:  # noqa: BLE001
                failures["ours-b1"] = f"overhead: {type(exc).__name__}: {exc}"
                _log(f"{w.tail}: overhead measurement FAILED: {failures['ours-b1'][:2000]}")
        for i, c in enumerate(concurrency):
            live = [x for x in configs if x in servers and x not in failures]
            for config in live[i % len(live):] + live[:i % len(live)] if live else []:
                try:
                    res = run_loadgen(w, config_format(config), servers[config], [c], warmup_s, duration_s,
                                      workdir, f"{config}-c{c}")
                except Exception as exc:  # noqa: BLE001 - that configuration is out of the run from here on
                    failures[config] = f"c={c}: {type(exc).__name__}: {exc}"
                    _log(f"{w.tail}: {config} FAILED: {failures[config][:2000]}")
                    continue
                points[config] += res["points"]
    finally:
        for srv in servers.values():
            srv.stop()
    rows = [_row(w, config, p) for config in configs for p in points[config]]
    return rows, failures, details


# ------------------------------------------------------------------------------------------------ summary


def _ratio(a, b) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def summarize_tail(rows: list[dict], overhead: dict | None, failures: dict, floor: dict | None = None,
                   ceiling: dict | None = None) -> dict:
    by = {}
    for r in rows:
        by.setdefault(r["config"], {})[r["concurrency"]] = r
    peak = {c: max((r["throughput_rps"] or 0.0) for r in pts.values()) for c, pts in by.items()}
    ml = [c for c in by if c in MLSERVER_CONFIGS]
    ours = by.get("ours-batched", {})

    def versus(ref: str) -> dict:
        common = sorted(set(ours) & set(by[ref]))
        p99 = [(ours[c]["p99_ms"], by[ref][c]["p99_ms"]) for c in common]
        return {"peak_throughput_ratio": _ratio(peak.get("ours-batched"), peak[ref]),
                "p99_never_worse": bool(common) and all(a is not None and b is not None and a <= b for a, b in p99),
                "p99_ratio_max": max((_ratio(a, b) for a, b in p99 if a is not None and b), default=None),
                "throughput_ratio_by_concurrency": {str(c): _ratio(ours[c]["throughput_rps"],
                                                                   by[ref][c]["throughput_rps"]) for c in common}}

    vs = {ref: versus(ref) for ref in ml} if ours else {}
    vs_triton = {t: versus(t) for t in TRITON if t in by} if ours else {}
    best = max(vs, key=lambda c: peak[c]) if vs else None
    reference = "mlserver" if "mlserver" in vs else best
    best_p99 = {}
    for c in ours:
        others = [by[m][c]["p99_ms"] for m in ml if c in by[m] and by[m][c]["p99_ms"] is not None]
        if others:
            best_p99[c] = min(others)
    b1 = by.get("ours-b1", {})
    gain32 = _ratio(ours[32]["throughput_rps"], b1[32]["throughput_rps"]) if 32 in ours and 32 in b1 else None
    triton_rows = [r for r in rows if r["config"] in TRITON]
    return {
        "peak_throughput_ratio_vs_mlserver": vs[reference]["peak_throughput_ratio"] if reference else None,
        "peak_throughput_ratio_vs_mlserver_torch": (vs["mlserver-torch"]["peak_throughput_ratio"]
                                                    if "mlserver-torch" in vs else None),
        "overhead_above_floor_ms_p50": (round(overhead["grpc_overhead_ms_p50"] - floor["grpc_overhead_ms_p50"], 4)
                                        if overhead and floor else None),
        "compute_ratio_vs_main_thread": overhead.get("compute_ratio_vs_main_thread") if overhead else None,
        "triton_served": bool(triton_rows) and all(r["all_ok"] and r["answers_match_reference"]
                                                   for r in triton_rows) and not any(t in failures for t in TRITON),
        "vs_triton": vs_triton,
        "batching_gain_at_32": gain32,
        # ours-batched (the tail's processes) over the same server in one process: what --processes buys
        "processes_gain": _ratio(peak.get("ours-batched"), peak.get("ours-p1")) if "ours-p1" in peak else None,
        "p99_never_worse_than_mlserver": vs[reference]["p99_never_worse"] if reference else None,
        "grpc_overhead_ms_p50": overhead["grpc_overhead_ms_p50"] if overhead else None,
        "grpc_overhead_floor_ms_p50": floor["grpc_overhead_ms_p50"] if floor else None,
        "bare_rpc_ms_p50": overhead["bare_rpc_ms_p50"] if overhead else None,
        "mlserver_reference": reference,
        "p99_ratio_max_vs_mlserver": vs[reference]["p99_ratio_max"] if reference else None,
        "best_mlserver": best,
        "peak_throughput_ratio_vs_best_mlserver": vs[best]["peak_throughput_ratio"] if best else None,
        "p99_never_worse_than_best_mlserver_p99": (all(ours[c]["p99_ms"] is not None and ours[c]["p99_ms"] <= v
                                                       for c, v in best_p99.items()) if best_p99 else None),
        "peak_throughput_rps": {c: round(v, 2) for c, v in peak.items()},
        "compute_ceiling_rps": ceiling["ceiling_rps"] if ceiling else None,
        "peak_fraction_of_ceiling": ({c: round(v / ceiling["ceiling_rps"], 4) for c, v in peak.items()}
                                     if ceiling and ceiling["ceiling_rps"] else None),
        "vs_mlserver_configs": vs,
        "max_other_cpu_cores": max((r["other_cpu_cores"] for r in rows if r.get("other_cpu_cores") is not None),
                                   default=None),
        "all_requests_ok": bool(rows) and all(r["all_ok"] for r in rows) and not failures,
        "answers_match_reference": bool(rows) and all(r["answers_match_reference"] for r in rows),
        "failed_configs": failures,
    }


def table(rows: list[dict]) -> str:
    head = (f"{'tail':>5} {'config':>13} {'c':>3} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'srv cores':>9} "
            f"{'srv ms/req':>10} {'lg cores':>8} {'other':>6} {'ok':>4}")
    lines = [head]

    def f(v, spec):
        return format(v, spec) if v is not None else format("-", ">" + spec.lstrip(">").split(".")[0].rstrip("f"))

    for r in rows:
        lines.append(f"{r['tail']:>5} {r['config']:>13} {r['concurrency']:>3} {f(r['throughput_rps'], '9.1f')} "
                     f"{f(r['p50_ms'], '9.2f')} {f(r['p99_ms'], '9.2f')} {f(r['server_cpu_cores'], '9.2f')} "
                     f"{f(r['server_cpu_ms_per_request'], '10.3f')} {f(r['loadgen_cpu_cores'], '8.2f')} "
                     f"{f(r.get('other_cpu_cores'), '6.2f')} "
                     f"{'yes' if r['all_ok'] and r['answers_match_reference'] else 'NO':>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="light tail, 1 and 4 clients, 1 s points (tests)")
    ap.add_argument("--tails", default=None, help=f"comma-separated from {','.join(TAILS)}")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated from {','.join(CONFIGS)} (default {','.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--tail-engine", default="auto", help="the 'best' engine of every tail: auto (measured here, "
                                                          "as the server's auto does) or torch/torchscript/onnxruntime")
    ap.add_argument("--concurrency", default=None, help="comma-separated client counts")
    ap.add_argument("--duration", type=float, default=None, help="measurement window per point, s")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up per point, s")
    ap.add_argument("--inputs", type=int, default=16, help="distinct requests cycled by the clients")
    ap.add_argument("--torch-threads", type=int, default=None, help=f"every tail (default per tail: {TAIL_SETTINGS})")
    ap.add_argument("--workers", type=int, default=None, help="every tail (default per tail)")
    ap.add_argument("--batch-max-size", type=int, default=None, help="every tail (default per tail)")
    ap.add_argument("--batch-max-delay-ms", type=float, default=None, help="every tail (default per tail)")
    ap.add_argument("--gil-switch-interval-ms", type=float, default=None, help="every tail (default per tail)")
    ap.add_argument("--inline-compute-max-ms", type=float, default=None,
                    help="our server, every tail (default: the server's own)")
    ap.add_argument("--processes", type=int, default=None, help="our server's processes, every tail (default per "
                    "tail)")
    ap.add_argument("--overhead-requests", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_serving")
    ap.add_argument("--mlserver-venv", type=Path, default=ROOT / "runs" / ".venv-mlserver")
    ap.add_argument("--rebuild", action="store_true", help="plan the bundles again")
    args = ap.parse_args(argv)

    from splitinfer.allocator import tune_allocator

    tune_allocator()  # as the daemons do
    tails = [t.strip() for t in (args.tails or ("light" if args.quick else ",".join(TAILS))).split(",")]
    configs = [c.strip() for c in args.configs.split(",")]
    for name, allowed in ((tails, TAILS), (configs, CONFIGS)):
        bad = [x for x in name if x not in allowed]
        if bad:
            ap.error(f"unknown {bad}; choose from {allowed}")
    concurrency = ([int(c) for c in args.concurrency.split(",")] if args.concurrency
                   else list(QUICK_CONCURRENCY if args.quick else CONCURRENCY))
    overrides = {k: getattr(args, k) for k in ("torch_threads", "workers", "batch_max_size", "batch_max_delay_ms",
                                               "gil_switch_interval_ms", "inline_compute_max_ms", "processes")
                 if getattr(args, k) is not None}
    per_tail = {t: Settings(**{**TAIL_SETTINGS[t], **overrides}) for t in tails}
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()
    if machine["load_average_at_start"][0] > 0.5:
        _log(f"warning: load average {machine['load_average_at_start']} before the run: other work on this "
             "machine will compete with the servers (see other_cpu_cores per point)")
    per_point = {t: (args.warmup if args.warmup is not None else (0.5 if args.quick else WARMUP_S[t]))
                 + (args.duration if args.duration is not None else (1.0 if args.quick else DURATION_S[t]))
                 for t in TAILS}
    _log(f"about {sum(len(configs) * (len(concurrency) * per_point[t] + 10) for t in tails) / 60:.0f} min of "
         "measurement (plus bundles and, on first use, MLServer's environment)")

    venv_stamp = None
    venv = None
    if any(c in MLSERVER_CONFIGS for c in configs):
        venv = args.mlserver_venv.resolve()
        venv_stamp = ensure_mlserver_venv(venv)

    rows: list[dict] = []
    summary: dict = {}
    tails_info: dict = {}
    for tail in tails:
        s = per_tail[tail]
        torch.set_num_threads(s.torch_threads)  # the in-process reference of the overhead runs as the servers do
        duration = args.duration if args.duration is not None else (1.0 if args.quick else DURATION_S[tail])
        warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else WARMUP_S[tail])
        overhead_n = (args.overhead_requests if args.overhead_requests is not None
                      else (max(5, OVERHEAD_REQUESTS[tail] // 20) if args.quick else OVERHEAD_REQUESTS[tail]))
        path, source = (light_bundle if tail == "light" else heavy_bundle)(workdir, args.rebuild)
        w = make_workload(tail, path, source, args.inputs)
        s, engine_info = tail_engine_for(w, s, args.tail_engine)
        per_tail[tail] = s
        _log(f"{tail}: {w.model_name} split {w.split} ({w.boundary_shape}), codec {w.codec}, payload "
             f"{statistics.fmean(len(p) for p in w.payloads):.0f} B; {len(configs)} configs x {len(concurrency)} "
             f"points x {warmup + duration:g} s")
        ceiling = compute_ceiling(w, s, args.quick)  # before any server starts: the machine is idle
        _log(f"{tail}: compute ceiling {ceiling['ceiling_rps']:.1f} samples/s (batch {ceiling['best_batch']}; "
             f"{ceiling['samples_per_s']})")
        tail_rows, failures, details = run_tail(w, configs, s, concurrency, warmup, duration, overhead_n, venv,
                                                workdir)
        rows += tail_rows
        summary[tail] = summarize_tail(tail_rows, details.get("grpc_overhead"), failures,
                                       details.get("grpc_overhead_floor"), ceiling)
        tails_info[tail] = {**w.describe(), "duration_s": duration, "warmup_s": warmup,
                            "server_settings": dataclasses.asdict(s),
                            "ours_env": {k: v for k, v in our_env(s, True, max(concurrency)).items()
                                         if k.startswith("SPLITINFER_CLOUD_")},
                            "grpc_overhead": details.get("grpc_overhead"),
                            "grpc_overhead_floor": details.get("grpc_overhead_floor"),
                            "mlserver_files": details["mlserver_files"], "tail_engine": engine_info,
                            "compute_ceiling": ceiling,
                            "triton": details.get("triton")}

    out = {
        "summary": summary,
        "settings": {
            "tails": tails_info, "configs": configs, "concurrency": concurrency,
            "server_settings": "per tail: tails.<tail>.server_settings (the same for our server and MLServer)",
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "quick": args.quick,
            "load_generator": {"processes": 1, "client": "grpc.aio, closed loop, one channel per client, "
                                                         "pre-serialized requests", "module": "bench.loadgen"},
            "request_formats": {
                "ours": "features UINT8 [payload_bytes] in raw_input_contents; request parameters split, codec, "
                        "codec.<meta> (as edge_agent.transport.CloudClient.infer_features)",
                "bytes": "features BYTES [1] (the same payload, one element) in raw_input_contents; split, codec, "
                         "codec.<meta> as input-tensor parameters (survive MLServer's batch merge per request)",
                "fp32": "features FP32 [1, *boundary] (the decoded tensor) in raw_input_contents; input parameter "
                        "split; no decoding in the runtime",
            },
            "config_formats": {c: config_format(c) for c in configs},
            "mlserver": None if venv_stamp is None else {
                "version": MLSERVER_VERSION, "venv": repo_path(venv), "environment": venv_stamp,
                "configs": {c: MLSERVER_CONFIGS[c] for c in configs if c in MLSERVER_CONFIGS},
                "runtime": "bench.mlserver_runtime.SplitTailModel", "adaptive_batching": {
                    t: {"max_batch_size": st.batch_max_size, "max_batch_time_s": st.batch_max_delay_ms / 1e3}
                    for t, st in per_tail.items()},
                "run_as": "mlserver start DIR (PYTHONPATH = this repository), settings.json + model-settings.json"},
            "machine": machine,
        },
        "results": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(table(rows))
    print(json.dumps({t: {k: v for k, v in sm.items() if k != "vs_mlserver_configs"} for t, sm in summary.items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
