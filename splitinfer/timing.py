"""Timing helpers (no torch): latency summaries and the one codec timing loop.

The profiler, ``plan make`` (learned codec, image operating point) and the codec benchmark time codecs with
:func:`time_codec`; anything else timed repeatedly goes through :func:`time_calls`. Both return
:class:`LatencyStats`, whose ``mean`` is a mean and ``p50`` a median: the cost model uses means (the
expectation it needs), benchmarks report medians under names that say so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class LatencyStats:
    """Summary of timed runs, in milliseconds (``p50`` is the median, ``mean`` the mean)."""

    p5: float
    p50: float
    p95: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        ms = sorted(s * 1e3 for s in seconds)
        if not ms:
            return cls(0.0, 0.0, 0.0, 0.0)

        def q(f: float) -> float:
            return ms[min(len(ms) - 1, max(0, round(f * (len(ms) - 1))))]

        return cls(p5=round(q(0.05), 5), p50=round(statistics.median(ms), 5), p95=round(q(0.95), 5),
                   mean=round(statistics.fmean(ms), 5))


def time_calls(fn: Callable[[int], Any], runs: int, warmup: int = 0,
               clock: Callable[[], float] = time.perf_counter) -> LatencyStats:
    """Call ``fn(i)`` for ``i`` in ``range(warmup)`` untimed, then for ``i`` in ``range(runs)`` timed."""
    for i in range(warmup):
        fn(i)
    seconds = []
    for i in range(runs):
        t0 = clock()
        fn(i)
        seconds.append(clock() - t0)
    return LatencyStats.of(seconds)


def alternate(fn_a: Callable[[], Any], fn_b: Callable[[], Any], rounds: int, runs: int,
              warmup: int = 3) -> tuple[float, float]:
    """Median latency (ms) of two callables timed in alternating rounds (both see the same machine state): each
    round times ``runs`` calls of ``fn_a`` then of ``fn_b`` (:func:`time_calls`, median); the result is the
    median over rounds of each. ``warmup`` untimed calls of each first."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(time_calls(lambda _i: fn_a(), runs).p50)
        tb.append(time_calls(lambda _i: fn_b(), runs).p50)
    return statistics.median(ta), statistics.median(tb)


@dataclass
class CodecTiming:
    """Encode and decode time of a codec (per call, ms) and its mean payload size (bytes)."""

    encode: LatencyStats
    decode: LatencyStats
    roundtrip: LatencyStats
    """Encode + decode of the same input, summarised per run."""
    payload_bytes: float
    """Mean payload size over the timed encodes."""
    runs: int

    @property
    def encode_ms(self) -> float:
        """Mean encode time (ms)."""
        return self.encode.mean

    @property
    def decode_ms(self) -> float:
        """Mean decode time (ms)."""
        return self.decode.mean


def time_codec(codec: Any, x: Any, runs: int, warmup: int = 1, rows: bool = False,
               clock: Callable[[], float] = time.perf_counter) -> CodecTiming:
    """Time ``codec.encode(x)`` and ``codec.decode(payload, meta)`` ``runs`` times after ``warmup`` untimed
    round trips. With ``rows``, timed run ``i`` (and warm-up ``i``) encodes row ``i % len(x)`` alone
    (``x[j : j + 1]``, batch 1) instead of ``x`` whole. ``x`` is whatever the codec encodes (a torch tensor,
    a numpy array)."""
    if runs < 1:
        raise ValueError("runs must be at least 1")

    def sample(i: int) -> Any:
        if not rows:
            return x
        j = i % len(x)
        return x[j : j + 1]

    for i in range(warmup):
        codec.decode(*codec.encode(sample(i)))
    enc, dec, both, sizes = [], [], [], []
    for i in range(runs):
        h = sample(i)
        t0 = clock()
        payload, meta = codec.encode(h)
        t1 = clock()
        codec.decode(payload, meta)
        t2 = clock()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
        both.append(t2 - t0)
        sizes.append(len(payload))
    return CodecTiming(LatencyStats.of(enc), LatencyStats.of(dec), LatencyStats.of(both),
                       statistics.fmean(sizes), runs)
