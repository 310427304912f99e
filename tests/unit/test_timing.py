"""The one timing helper: means are means, medians are medians, and the codec loop times what it says."""

import numpy as np
import pytest

from splitinfer.timing import LatencyStats, time_calls, time_codec


class FakeClock:
    """A clock that advances only when told (``tick``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


class SlowCodec:
    """Encode of row ``i`` takes ``i + 1`` ms and yields ``i + 1`` bytes; decode takes 0.5 ms."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.encoded: list[int] = []

    def encode(self, x: np.ndarray) -> tuple[bytes, dict]:
        i = int(x.reshape(-1)[0])
        self.encoded.append(i)
        self.clock.tick((i + 1) * 1e-3)
        return b"x" * (i + 1), {"i": i}

    def decode(self, payload: bytes, meta: dict) -> np.ndarray:
        self.clock.tick(0.5e-3)
        return np.zeros(1)


def test_latency_stats_mean_is_a_mean_and_p50_a_median():
    s = LatencyStats.of([0.001, 0.001, 0.010])
    assert s.mean == pytest.approx(4.0) and s.p50 == pytest.approx(1.0)
    assert LatencyStats.of([]) == LatencyStats(0.0, 0.0, 0.0, 0.0)


def test_time_codec_cycles_rows_after_warmup_and_reports_means():
    clock = FakeClock()
    codec = SlowCodec(clock)
    rows = np.arange(3, dtype=np.float32)[:, None]
    t = time_codec(codec, rows, runs=4, warmup=2, rows=True, clock=clock)
    assert codec.encoded == [0, 1, 0, 1, 2, 0]  # warm-up rows 0, 1; timed rows 0, 1, 2, 0
    assert t.runs == 4
    assert t.encode_ms == pytest.approx((1 + 2 + 3 + 1) / 4) and t.encode.p50 == pytest.approx(1.5)
    assert t.decode_ms == pytest.approx(0.5)
    assert t.roundtrip.mean == pytest.approx(t.encode_ms + t.decode_ms)
    assert t.payload_bytes == pytest.approx((1 + 2 + 3 + 1) / 4)


def test_time_codec_whole_tensor_and_time_calls():
    clock = FakeClock()
    codec = SlowCodec(clock)
    t = time_codec(codec, np.full((2, 1), 4.0), runs=3, clock=clock)
    assert codec.encoded == [4] * 4 and t.encode_ms == pytest.approx(5.0) and t.payload_bytes == 5
    with pytest.raises(ValueError):
        time_codec(codec, np.zeros(1), runs=0)
    seen = []
    s = time_calls(lambda i: (seen.append(i), clock.tick(2e-3)), runs=2, warmup=1, clock=clock)
    assert seen == [0, 0, 1] and s.mean == pytest.approx(2.0)
