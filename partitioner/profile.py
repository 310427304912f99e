"""Profiling a staged model on this machine: what the cost model needs, measured, and saved as JSON.

A profile holds, for one model on one machine and thread count:

* per-stage latency distributions at batch 1 (median, p5, p95, mean of ``repeats`` timed runs, after warm-up;
  the cost model uses the mean, the expectation it needs: on a device whose CPU is shared or throttled, stalls
  land in a few stages and a median would miss them),
  and for a server profile the per-stage time of whole batches at each of ``batch_sizes``;
* per-boundary tensor bytes (float32) and the codec's payload bytes and encode/decode means;
* multiply-accumulates and parameters per stage (with model totals ``total_macs`` / ``total_params``);
* the head's peak memory per split: weights of stages ``[:k]`` plus the largest set of simultaneously live
  activations while they run (from the traced graph's tensor shapes; the allocator's overhead is not counted);
* the machine, CPU, torch version and threads it was measured with.

Profiles are measured on each machine (``splitinfer plan profile ... --out FILE.json``) and combined by the
planner: the edge's at batch 1 with the server's (see :mod:`partitioner.cost`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitinfer.allocator import tune_allocator
from splitinfer.codec import Codec
from splitinfer.errors import BundleError
from splitinfer.exits import ExitHead
from splitinfer.head import ExitPolicy, walk
from splitinfer.progress import progress_bar
from splitinfer.staged import StagedModel
from splitinfer.timing import LatencyStats, time_codec
from splitinfer.torch_head import TorchStages

PROFILE_FORMAT = "splitinfer-profile"
PROFILE_VERSION = 1


@dataclass
class Profile:
    """Measured costs (milliseconds) and sizes (bytes) for one model on one machine."""

    machine: str
    threads: int
    repeats: int
    stage_ms: list[float]
    exit_ms: dict[int, float]
    encode_ms: list[float]
    decode_ms: list[float]
    payload_bytes: list[int]
    fp32_bytes: list[int]
    stage_macs: list[int] = field(default_factory=list)
    stage_params: list[int] = field(default_factory=list)
    stage_ms_stats: list[LatencyStats] = field(default_factory=list)
    batch_stage_ms: dict[int, list[float]] = field(default_factory=dict)
    head_peak_bytes: list[int] = field(default_factory=list)
    model: str = ""
    input_shape: list[int] = field(default_factory=list)
    codec: str = ""
    cpu: str = ""
    torch_version: str = ""
    output_bytes: int = 0
    request_overhead_ms: float = 0.0  # the serving agent's own per-request work (set from the agent's figure)
    exit_overhead_ms: float = 0.0  # the agent's own work per exit it evaluates, beyond the exit head (measured)

    @property
    def num_stages(self) -> int:
        return len(self.stage_ms)

    @property
    def total_macs(self) -> int:
        return int(sum(self.stage_macs))

    @property
    def total_params(self) -> int:
        return int(sum(self.stage_params))

    def server_stage_ms(self, batch: int) -> list[float]:
        """Per-stage time of a whole batch of ``batch`` samples: measured, or interpolated linearly between the
        nearest measured batch sizes (extrapolated from the largest one, per sample)."""
        if batch <= 1 or not self.batch_stage_ms:
            return list(self.stage_ms) if batch <= 1 else [t * batch for t in self.stage_ms]
        sizes = sorted(self.batch_stage_ms)
        if batch in self.batch_stage_ms:
            return list(self.batch_stage_ms[batch])
        lower = max((b for b in sizes if b < batch), default=1)
        upper = min((b for b in sizes if b > batch), default=None)
        lo = self.stage_ms if lower == 1 else self.batch_stage_ms[lower]
        if upper is None:
            return [t * batch / lower for t in lo]
        hi = self.batch_stage_ms[upper]
        f = (batch - lower) / (upper - lower)
        return [a + f * (b - a) for a, b in zip(lo, hi, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, **d}
        d["exit_ms"] = {str(k): v for k, v in self.exit_ms.items()}
        d["batch_stage_ms"] = {str(k): v for k, v in self.batch_stage_ms.items()}
        d["total_macs"] = self.total_macs
        d["total_params"] = self.total_params
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        """Parse a profile written by :meth:`to_dict`; ValueError when it is not one or is inconsistent."""
        if not isinstance(d, dict) or d.get("format", PROFILE_FORMAT) != PROFILE_FORMAT:
            raise ValueError("not a splitinfer profile (format must be 'splitinfer-profile')")
        if d.get("version", PROFILE_VERSION) != PROFILE_VERSION:
            raise ValueError(f"profile version {d.get('version')!r} is not supported (expected {PROFILE_VERSION})")
        try:
            prof = cls(
                machine=str(d["machine"]), threads=int(d["threads"]), repeats=int(d["repeats"]),
                stage_ms=[float(v) for v in d["stage_ms"]],
                exit_ms={int(k): float(v) for k, v in d.get("exit_ms", {}).items()},
                encode_ms=[float(v) for v in d["encode_ms"]], decode_ms=[float(v) for v in d["decode_ms"]],
                payload_bytes=[int(v) for v in d["payload_bytes"]], fp32_bytes=[int(v) for v in d["fp32_bytes"]],
                stage_macs=[int(v) for v in d.get("stage_macs", [])],
                stage_params=[int(v) for v in d.get("stage_params", [])],
                stage_ms_stats=[LatencyStats(**s) for s in d.get("stage_ms_stats", [])],
                batch_stage_ms={int(k): [float(x) for x in v] for k, v in d.get("batch_stage_ms", {}).items()},
                head_peak_bytes=[int(v) for v in d.get("head_peak_bytes", [])],
                model=str(d.get("model", "")), input_shape=[int(v) for v in d.get("input_shape", [])],
                codec=str(d.get("codec", "")), cpu=str(d.get("cpu", "")),
                torch_version=str(d.get("torch_version", "")), output_bytes=int(d.get("output_bytes", 0)),
                request_overhead_ms=float(d.get("request_overhead_ms", 0.0)),
                exit_overhead_ms=float(d.get("exit_overhead_ms", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed profile: {exc!r}") from exc
        n = prof.num_stages
        lengths = {"encode_ms": n + 1, "decode_ms": n + 1, "payload_bytes": n + 1, "fp32_bytes": n + 1}
        for name, want in lengths.items():
            if len(getattr(prof, name)) != want:
                raise ValueError(f"malformed profile: {name} has {len(getattr(prof, name))} entries, expected {want}")
        for b, v in prof.batch_stage_ms.items():
            if len(v) != n or b < 1:
                raise ValueError(f"malformed profile: batch {b} times do not cover the {n} stages")
        if any(t < 0 for t in prof.stage_ms):
            raise ValueError("malformed profile: negative stage time")
        return prof

    def check_matches(self, staged: StagedModel) -> None:
        """Raise ValueError unless this profile was measured on a model with ``staged``'s stages and boundaries."""
        if self.num_stages != staged.num_stages:
            raise ValueError(f"profile has {self.num_stages} stages but the model has {staged.num_stages}: "
                             f"it was measured for another model (profile model {self.model!r})")
        want = [b.fp32_bytes for b in staged.boundaries]
        if self.fp32_bytes != want:
            raise ValueError("profile's boundary sizes differ from the model's: measured for another model or "
                             "input size")


def save_profile(prof: Profile, path: str | Path) -> Path:
    """Write ``prof`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prof.to_dict(), indent=1))
    return path


def load_profile(path: str | Path) -> Profile:
    """Read a profile file; BundleError with the reason when it is missing or broken."""
    try:
        data = json.loads(Path(path).read_text())
        return Profile.from_dict(data)
    except FileNotFoundError as exc:
        raise BundleError(f"profile {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise BundleError(f"cannot read profile {path}: {exc}") from exc


def machine_description() -> tuple[str, str]:
    """(host and architecture, CPU model name) of this machine."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} {platform.machine()} ({os.cpu_count()} cpus)", cpu


def head_peak_bytes(staged: StagedModel, exits: dict[int, ExitHead] | None = None) -> list[int]:
    """For every split ``k`` (0..N): bytes of the head's weights (stages ``[:k]`` and exits at boundaries
    ``<= k``) plus the largest activation working set of those stages."""
    exits = exits or {}
    out = [0]
    weights = 0
    act = staged.boundaries[0].fp32_bytes
    for k in range(staged.num_stages):
        weights += sum(p.numel() * p.element_size() for p in staged.stages[k].parameters())
        if k + 1 in exits:
            weights += sum(p.numel() * p.element_size() for p in exits[k + 1].parameters())
        act = max(act, staged.stage_info[k].peak_activation_bytes)
        out.append(int(weights + act))
    return out


def _time_stages(staged: StagedModel, exits: dict[int, ExitHead], x0: torch.Tensor, runs: int, warmup: int,
                 bar: Any | None) -> tuple[list[list[float]], dict[int, list[float]], list[torch.Tensor]]:
    """``warmup + runs`` walks (:func:`splitinfer.head.walk`) through every stage, evaluating every exit; the
    timed runs' seconds per stage and per exit, and the boundary tensors of the last run (0..N).

    An exit costs what the agent spends on it: the exit head's logits (``StageBackend.exit_logits``) and one
    :meth:`ExitPolicy.check` (one softmax: score and top-1)."""
    n = staged.num_stages
    backend = TorchStages(staged, exits)
    policy = ExitPolicy(dict.fromkeys(exits, math.inf))  # the decision's cost; nothing fires, every stage runs
    stage_t: list[list[float]] = [[] for _ in range(n)]
    exit_t: dict[int, list[float]] = {b: [] for b in exits}
    tensors: list[torch.Tensor] = []
    for r in range(warmup + runs):
        timed, last = r >= warmup, r == warmup + runs - 1
        if last:
            tensors = [x0]
        for step in walk(backend, x0, n, exits=exits, points=range(1, n)):
            exit_s = step.exit_s
            if step.logits is not None:
                t0 = time.perf_counter()
                policy.check(step.boundary, step.logits)
                exit_s += time.perf_counter() - t0
            if timed:
                stage_t[step.boundary - 1].append(step.head_s)
                if step.logits is not None:
                    exit_t[step.boundary].append(exit_s)
            if last:
                tensors.append(step.tensor.clone())  # a later stage may work in place on its input
        if bar is not None:
            bar.update(1)
    return stage_t, exit_t, tensors


@dataclass
class StageTimes:
    """One model's batch-1 stage and exit times, as summaries (ms)."""

    stages: list[LatencyStats]
    exits: dict[int, LatencyStats]


def time_stages_interleaved(models: dict[str, StagedModel], exits: dict[int, ExitHead], example: torch.Tensor,
                            runs: int, rounds: int = 10, warmup: int = 5) -> dict[str, StageTimes]:
    """Several models' stage and exit times measured under the same conditions: ``rounds`` rounds, each walking
    every model ``ceil(runs / rounds)`` times in turn (after ``warmup`` untimed walks of each), at 1 thread.

    Timing the models one after the other lets a slow spell of the machine (another process, a frequency step)
    land on one of them only: here fp32 and a compressed variant measured 30 walks apart differed by up to 25 %
    between calls, enough to flip which variant the planner picks. Interleaving spreads such spells over all of
    them; compare their medians (``p50``), which one interrupted walk does not move."""
    per_round = max(1, math.ceil(runs / rounds))
    stage_t: dict[str, list[list[float]]] = {n: [[] for _ in range(m.num_stages)] for n, m in models.items()}
    exit_t: dict[str, dict[int, list[float]]] = {n: {b: [] for b in exits} for n in models}
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for m in models.values():
                _time_stages(m, exits, example[:1], 0, warmup, None)
            for _ in range(rounds):
                for name, m in models.items():
                    st, et, _ = _time_stages(m, exits, example[:1], per_round, 0, None)
                    for i, t in enumerate(st):
                        stage_t[name][i].extend(t)
                    for b, t in et.items():
                        exit_t[name][b].extend(t)
    finally:
        torch.set_num_threads(prev)
    return {n: StageTimes([LatencyStats.of(t) for t in stage_t[n]], {b: LatencyStats.of(t) for b, t in
                                                                    exit_t[n].items()}) for n in models}


@torch.inference_mode()
def profile_model(staged: StagedModel, exits: dict[int, ExitHead], codec: Codec, example: torch.Tensor,
                  repeats: int = 30, warmup: int = 5, threads: int = 1, batch_sizes: tuple[int, ...] = (),
                  model_name: str = "", progress: bool = False, codec_repeats: int | None = None) -> Profile:
    """Measure ``staged`` here: batch-1 stage and exit times (``repeats`` runs after ``warmup``), the codec at
    every boundary, and, for each size in ``batch_sizes`` above 1, whole-batch stage times (fewer runs for
    larger batches: ``max(3, repeats // b)``)."""
    tune_allocator()  # as the daemons do: profiles must measure their steady state
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    example = example[:1]
    big = sorted({int(b) for b in batch_sizes if int(b) > 1})
    batch_runs = {b: max(3, repeats // b) for b in big}
    codec_runs = codec_repeats if codec_repeats is not None else max(5, repeats // 3)
    total = warmup + repeats + sum(2 + r for r in batch_runs.values()) + staged.num_stages + 1
    bar = progress_bar(total=total, desc=f"profiling {model_name or 'model'} ({threads} thread{'s' * (threads > 1)})",
                       enabled=progress, leave=False)
    try:
        stage_t, exit_t, boundary_tensors = _time_stages(staged, exits, example, repeats, warmup, bar)
        batch_stage_ms: dict[int, list[float]] = {}
        for b in big:
            xb = example.expand(b, *example.shape[1:]).contiguous()
            bt, _, _ = _time_stages(staged, {}, xb, batch_runs[b], 2, bar)
            batch_stage_ms[b] = [round(statistics.fmean(s) * 1e3, 5) for s in bt]
        enc_ms, dec_ms, sizes = [], [], []
        for t in boundary_tensors:
            timing = time_codec(codec, t, runs=codec_runs, warmup=1)
            enc_ms.append(timing.encode_ms)
            dec_ms.append(timing.decode_ms)
            sizes.append(int(round(timing.payload_bytes)))
            bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(prev_threads)
    stats = [LatencyStats.of(s) for s in stage_t]
    machine, cpu = machine_description()
    out = boundary_tensors[-1]
    return Profile(
        machine=machine, cpu=cpu, torch_version=torch.__version__, threads=threads, repeats=repeats,
        stage_ms=[s.mean for s in stats], stage_ms_stats=stats,
        exit_ms={b: round(statistics.fmean(v) * 1e3, 5) for b, v in exit_t.items()},
        encode_ms=enc_ms, decode_ms=dec_ms, payload_bytes=sizes,
        fp32_bytes=[b.fp32_bytes for b in staged.boundaries],
        stage_macs=[s.macs for s in staged.stage_info], stage_params=[s.params for s in staged.stage_info],
        batch_stage_ms=batch_stage_ms, head_peak_bytes=head_peak_bytes(staged, exits),
        model=model_name, input_shape=list(example.shape[1:]), codec=codec.name,
        output_bytes=int(out[0].numel() * out.element_size()),
    )
