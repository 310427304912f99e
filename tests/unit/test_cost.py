import pytest

from partitioner.cost import (
    PROTOCOL_OVERHEAD_BYTES,
    Link,
    estimate_all,
    estimate_split,
    parse_bandwidth,
    parse_duration,
)
from partitioner.profile import Profile


def _profile(n=4):
    return Profile(machine="t", threads=1, repeats=1, stage_ms=[1.0] * n, exit_ms={2: 0.5},
                   encode_ms=[0.1] * (n + 1), decode_ms=[0.2] * (n + 1), payload_bytes=[1000] * (n + 1),
                   fp32_bytes=[4000] * (n + 1))


def test_parse_units():
    assert parse_bandwidth("5mbit") == 5e6
    assert parse_bandwidth("500kbit") == 5e5
    assert parse_duration("20ms") == 0.02
    assert parse_duration("0.5s") == 0.5
    for bad in ("fast", "-1mbit", "0"):
        with pytest.raises(ValueError):
            parse_bandwidth(bad)


def test_estimate_matches_hand_computation():
    p = _profile()
    link = Link(8e6, 0.010)
    e = estimate_split(3, p, p, {2: 0.25}, link)
    transfer = (1000 + PROTOCOL_OVERHEAD_BYTES) * 8 / 8e6 * 1e3
    t_exit = 2.0 + 0.5
    t_off = 3.0 + 0.5 + 0.1 + transfer + 10.0 + 0.2 + 1.0
    assert e.expected_latency_ms == pytest.approx(0.25 * t_exit + 0.75 * t_off, abs=1e-3)
    assert e.exits == [2] and e.offload_rate == 0.75


def test_edge_only_and_cloud_only_and_slowdown():
    p = _profile()
    link = Link(1e6, 0.05)
    est = estimate_all(p, p, {2: 0.5}, link)
    assert len(est) == 5
    assert est[0].exits == [] and est[0].offload_rate == 1.0
    assert est[4].bytes_per_offload == 0 and est[4].transfer_ms == 0
    assert est[4].expected_latency_ms == pytest.approx(0.5 * 2.5 + 0.5 * 4.5)
    slow = estimate_all(p, p, {2: 0.5}, link, edge_slowdown=10)
    assert slow[4].expected_latency_ms == pytest.approx(10 * est[4].expected_latency_ms)
    assert slow[0].expected_latency_ms == pytest.approx(est[0].expected_latency_ms + 9 * 0.1)
