"""Profiling on this machine: per-stage latency (median of repeated timed runs), exits and codec costs."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from splitinfer.codec import Codec
from splitinfer.exits import ExitHead
from splitinfer.staged import StagedModel


@dataclass
class Profile:
    """Measured costs at batch 1 (milliseconds) and sizes (bytes) for one model on one machine."""

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

    def to_dict(self) -> dict:
        return asdict(self)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


@torch.inference_mode()
def profile_model(staged: StagedModel, exits: dict[int, ExitHead], codec: Codec, example: torch.Tensor,
                  repeats: int = 30, warmup: int = 5, threads: int = 1) -> Profile:
    """Time every stage, exit head and the codec at every boundary; medians of ``repeats`` runs."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = staged.num_stages
        stage_t: list[list[float]] = [[] for _ in range(n)]
        exit_t: dict[int, list[float]] = {b: [] for b in exits}
        boundary_tensors: list[torch.Tensor] = []
        for r in range(warmup + repeats):
            x = example
            tensors = [x]
            for k in range(n):
                if k in exits:
                    t0 = time.perf_counter()
                    exits[k](x)
                    if r >= warmup:
                        exit_t[k].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                x = staged.stages[k](x)
                if r >= warmup:
                    stage_t[k].append(time.perf_counter() - t0)
                tensors.append(x)
            boundary_tensors = tensors
        enc_ms, dec_ms, sizes = [], [], []
        for t in boundary_tensors:
            e, d = [], []
            payload, meta = codec.encode(t)
            for _ in range(max(5, repeats // 3)):
                t0 = time.perf_counter()
                payload, meta = codec.encode(t)
                t1 = time.perf_counter()
                codec.decode(payload, meta)
                t2 = time.perf_counter()
                e.append(t1 - t0)
                d.append(t2 - t1)
            enc_ms.append(_median_ms(e))
            dec_ms.append(_median_ms(d))
            sizes.append(len(payload))
    finally:
        torch.set_num_threads(prev_threads)
    return Profile(
        machine=f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        threads=threads, repeats=repeats,
        stage_ms=[_median_ms(s) for s in stage_t],
        exit_ms={b: _median_ms(v) for b, v in exit_t.items()},
        encode_ms=enc_ms, decode_ms=dec_ms, payload_bytes=sizes,
        fp32_bytes=[b.fp32_bytes for b in staged.boundaries],
        stage_macs=[s.macs for s in staged.stage_info],
    )
