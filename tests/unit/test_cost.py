import math

import pytest

from partitioner.cost import (
    MIN_RTO_S,
    PROTOCOL_OVERHEAD_BYTES,
    RESPONSE_OVERHEAD_BYTES,
    Link,
    estimate_all,
    estimate_split,
    parse_bandwidth,
    parse_duration,
    queue_wait_s,
)
from partitioner.profile import Profile


def _profile(n=4, output_bytes=40):
    return Profile(machine="t", threads=1, repeats=1, stage_ms=[1.0] * n, exit_ms={2: 0.5},
                   encode_ms=[0.1] * (n + 1), decode_ms=[0.2] * (n + 1), payload_bytes=[1000] * (n + 1),
                   fp32_bytes=[4000] * (n + 1), output_bytes=output_bytes)


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
    up = (1000 + PROTOCOL_OVERHEAD_BYTES) * 8 / 8e6 * 1e3
    down = (40 + RESPONSE_OVERHEAD_BYTES) * 8 / 8e6 * 1e3
    t_exit = 2.0 + 0.5
    t_off = 3.0 + 0.5 + 0.1 + up + 10.0 + 0.2 + 1.0 + down
    assert e.expected_latency_ms == pytest.approx(0.25 * t_exit + 0.75 * t_off, abs=1e-3)
    assert e.exits == [2] and e.offload_rate == 0.75


def test_downlink_rate_and_loss_terms():
    p = _profile(output_bytes=4000)
    base = estimate_split(0, p, p, {}, Link(8e6, 0.05))
    slow_down = estimate_split(0, p, p, {}, Link(8e6, 0.05, down_bps=1e6))
    extra = (4000 + RESPONSE_OVERHEAD_BYTES) * 8 * (1 / 1e6 - 1 / 8e6) * 1e3
    assert slow_down.expected_latency_ms - base.expected_latency_ms == pytest.approx(extra, abs=1e-3)
    lossy = estimate_split(0, p, p, {}, Link(8e6, 0.05, loss=0.01))
    total = 1000 + 4000 + PROTOCOL_OVERHEAD_BYTES + RESPONSE_OVERHEAD_BYTES
    packets = math.ceil(total / 1448)
    expected = (1 - 0.99 ** packets) * max(MIN_RTO_S, 0.1) * 1e3
    assert lossy.expected_latency_ms - base.expected_latency_ms == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError):
        Link(1e6, 0.01, loss=1.0)


def test_server_queueing_is_md1_and_saturates():
    assert queue_wait_s(0.01, 0) == 0
    assert queue_wait_s(0.01, 50) == pytest.approx(0.5 * 0.01 / (2 * 0.5))
    assert queue_wait_s(0.01, 100) == math.inf
    p = _profile()
    idle = estimate_split(1, p, p, {}, Link(8e6, 0.01))
    busy = estimate_split(1, p, p, {}, Link(8e6, 0.01), server_load_rps=200)
    service = 0.2 + 3.0
    assert busy.server_ms - idle.server_ms == pytest.approx(queue_wait_s(service / 1e3, 200) * 1e3, abs=1e-3)


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


def test_agent_overhead_is_paid_by_every_request_and_scaled_with_the_edge():
    p = _profile()
    link = Link(8e6, 0.01)
    base = estimate_all(p, p, {2: 0.5}, link)
    p.request_overhead_ms = 0.7
    more = estimate_all(p, p, {2: 0.5}, link, edge_slowdown=2)
    slow = estimate_all(_profile(), _profile(), {2: 0.5}, link, edge_slowdown=2)
    for a, b in zip(slow, more, strict=True):
        assert b.expected_latency_ms - a.expected_latency_ms == pytest.approx(1.4, abs=1e-3)
    assert len(base) == len(more)


def test_exit_overhead_is_paid_per_exit_evaluated_on_the_path():
    p = _profile()
    link = Link(8e6, 0.01)
    base = {e.split: e for e in estimate_all(p, p, {2: 0.5}, link)}
    p.exit_overhead_ms = 0.2
    more = {e.split: e for e in estimate_all(p, p, {2: 0.5}, link)}
    for k in (0, 1):  # exit 2 is not on the edge's path
        assert more[k].expected_latency_ms == pytest.approx(base[k].expected_latency_ms)
    for k in (2, 3, 4):  # every request evaluates exit 2 (half answer there, the rest go on): 0.2 ms more each
        assert more[k].expected_latency_ms - base[k].expected_latency_ms == pytest.approx(0.2, abs=1e-6)
