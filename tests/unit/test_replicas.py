"""Client-side balancing: retries on another replica, circuit breakers, no retry for the request's own faults."""

from __future__ import annotations

import pytest

from edge_agent.replicas import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, ReplicaSet
from splitinfer.errors import InvalidInput, Unavailable


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class FakeClient:
    def __init__(self, address: str, down: bool = False):
        self.address = address
        self.down = down
        self.calls = 0
        self.bad_request = False

    def infer_features(self, payload, meta, split, codec, request_id="", timeout_s=None):
        self.calls += 1
        if self.down:
            raise Unavailable(f"{self.address} is down")
        if self.bad_request:
            raise InvalidInput("bad payload")
        return f"answer from {self.address}"

    def server_ready(self) -> bool:
        return not self.down

    def check_ready(self) -> None:
        if self.down:
            raise Unavailable(f"{self.address} is down")

    def close(self) -> None:
        pass


def make(n_down: int, n: int = 3, **kw):
    clock = Clock()
    clients = [FakeClient(f"r{i}", down=i < n_down) for i in range(n)]
    rs = ReplicaSet(clients, timeout_s=5.0, backoff_s=0.01, clock=clock, sleep=clock.sleep,
                    breaker=lambda: CircuitBreaker(2, 1.0, 8.0, clock=clock), **kw)
    return rs, clients, clock


def call(rs):
    return rs.infer_features(b"x", {}, 3, "c")


def test_requests_spread_over_healthy_replicas():
    rs, clients, _ = make(0)
    for _ in range(30):
        call(rs)
    assert [c.calls for c in clients] == [10, 10, 10]


def test_an_unavailable_replica_is_retried_elsewhere_and_then_skipped():
    rs, clients, _ = make(1)
    answers = [call(rs) for _ in range(20)]
    assert all(a.startswith("answer from r") and a != "answer from r0" for a in answers)
    assert clients[0].calls == 2  # two failures open its breaker; afterwards it costs nothing
    assert rs.replicas[0].breaker.state == OPEN and rs.retries == 2


def test_breaker_half_opens_after_cooldown_and_closes_on_success():
    rs, clients, clock = make(1)
    for _ in range(5):
        call(rs)
    clients[0].down = False
    clock.t += 1.0
    before = clients[0].calls
    for _ in range(6):
        call(rs)
    assert clients[0].calls > before and rs.replicas[0].breaker.state == CLOSED


def test_failed_trial_doubles_the_cooldown():
    b = CircuitBreaker(1, 1.0, 3.0, clock=(clock := Clock()))
    b.record_failure()
    assert b.state == OPEN and not b.allow()
    clock.t = 1.0
    assert b.allow() and b.state == HALF_OPEN and not b.allow()  # a single trial at a time
    b.record_failure()
    assert b.state == OPEN and b.cooldown_s == 2.0
    clock.t = 2.5
    assert not b.allow()
    clock.t = 3.0
    assert b.allow()
    b.record_failure()
    assert b.cooldown_s == 3.0  # capped
    clock.t = 6.0
    assert b.allow()
    b.record_success()
    assert b.state == CLOSED and b.cooldown_s == 1.0


def test_all_replicas_down_fails_fast_once_breakers_are_open():
    rs, clients, _ = make(3)
    with pytest.raises(Unavailable, match="no replica answered"):
        call(rs)
    with pytest.raises(Unavailable):
        call(rs)
    calls = sum(c.calls for c in clients)
    with pytest.raises(Unavailable, match="circuit breaker is open"):
        call(rs)
    assert sum(c.calls for c in clients) == calls  # nothing was tried


def test_request_faults_are_not_retried():
    rs, clients, _ = make(0)
    for c in clients:
        c.bad_request = True
    with pytest.raises(InvalidInput):
        call(rs)
    assert sum(c.calls for c in clients) == 1 and rs.retries == 0


def test_server_side_faults_fail_over_to_another_replica():
    from edge_agent.transport import RemoteError

    rs, clients, _ = make(0)

    def internal(*args, **kwargs):
        clients[0].calls += 1
        raise RemoteError("cloud server answered INTERNAL: boom")

    clients[0].infer_features = internal
    answers = [call(rs) for _ in range(9)]
    assert all(a != "answer from r0" for a in answers) and rs.retries >= 1
    assert clients[0].calls == 2 and rs.replicas[0].breaker.state == OPEN


def test_retries_stop_at_the_deadline():
    clock = Clock()
    clients = [FakeClient(f"r{i}", down=True) for i in range(5)]
    rs = ReplicaSet(clients, timeout_s=0.05, backoff_s=0.04, clock=clock, sleep=clock.sleep,
                    breaker=lambda: CircuitBreaker(5, 1.0, clock=clock))
    with pytest.raises(Unavailable):
        call(rs)
    assert sum(c.calls for c in clients) < 5


def test_server_ready_checks_replicas_until_one_is_ready():
    rs, clients, _ = make(2)
    assert rs.server_ready()
    rs2, _, _ = make(3)
    assert not rs2.server_ready()
