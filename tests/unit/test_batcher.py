"""The dynamic batcher with a fake tail: batch formation, isolation of failures, bounds, deadlines, close.

The batching policy (max delay, max batch, sharing, linger, deadlines, close) runs on a :class:`FakeClock` and a
:class:`ManualExecutor`: time moves and a batch's compute ends only when the test says, so each test states the
exact batches it expects and takes no real time. A few tests keep a real thread pool and the real clock: they
check real concurrency (threads, the event loop) rather than the policy.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cloud_server.batcher import LINGER_FACTOR, QUIET_S, Batcher, BatchKey, Job
from cloud_server.decode import Staged
from cloud_server.errors import Overloaded
from splitinfer.errors import DeadlineExceeded, InvalidInput, Unavailable

F3, F5, IN = BatchKey.features(3), BatchKey.features(5), BatchKey.model_input()


class FakeTail:
    """Logits = input * 10 + split; records every batch it ran; can be held to let the queue build up. With a
    ``clock``, each run takes ``run_s`` of that clock's time."""

    def __init__(self, clock: FakeClock | None = None, run_s: float = 0.0):
        self.calls: list[tuple[BatchKey, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.clock, self.run_s = clock, run_s

    def __call__(self, key: BatchKey, x: torch.Tensor) -> np.ndarray:
        self.gate.wait(10)
        if self.clock is not None:
            self.clock.advance(self.run_s)
        self.calls.append((key, int(x.shape[0])))
        return (x.reshape(x.shape[0], -1) * 10 + key.split).numpy()


class _Timer:
    def __init__(self, when: float, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """The batcher's clock, moved by :meth:`advance` only; due timers fire during the advance."""

    def __init__(self):
        self.t = 1000.0
        self._timers: list[_Timer] = []

    def now(self) -> float:
        return self.t

    def call_later(self, delay: float, callback) -> _Timer:
        timer = _Timer(self.t + delay, callback)
        self._timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.t += seconds
        due = sorted((t for t in self._timers if not t.cancelled and t.when <= self.t), key=lambda t: t.when)
        self._timers = [t for t in self._timers if not t.cancelled and t.when > self.t]
        for timer in due:
            timer.callback()


class ManualExecutor(Executor):
    """Worker threads whose batches compute only when the test calls :meth:`finish` (on the test's thread)."""

    def __init__(self):
        self.pending: deque[tuple[Future, object, tuple]] = deque()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self.pending.append((future, fn, args))
        return future

    def finish(self, n: int | None = None) -> None:
        """Compute the ``n`` oldest submitted batches (all by default)."""
        for _ in range(len(self.pending) if n is None else n):
            future, fn, args = self.pending.popleft()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the batcher like a worker's failure
                future.set_exception(exc)


async def turn() -> None:
    """Let the event loop run until everything ready has run (no time passes on the fake clock)."""
    for _ in range(50):
        await asyncio.sleep(0)


def job(value: float, key: BatchKey = F3, samples: int = 1, fail: bool = False,
        timeout_s: float | None = None) -> Job:
    def prepare() -> torch.Tensor:
        if fail:
            raise InvalidInput(f"bad payload {value}")
        return torch.full((samples, 2), float(value))

    return Job(key=key, samples=samples, prepare=prepare, timeout_s=timeout_s)


def run(coro):
    return asyncio.run(coro)


def policy(tail: FakeTail | None = None, **kwargs) -> tuple[Batcher, FakeClock, ManualExecutor, FakeTail]:
    """A batcher on a fake clock and a manual executor (call inside the event loop)."""
    clock, pool = FakeClock(), ManualExecutor()
    tail = tail or FakeTail(clock)
    tail.clock = clock
    b = Batcher(tail, pool, clock=clock, **kwargs)
    b.start()
    return b, clock, pool, tail


def sizes(tail: FakeTail) -> list[int]:
    return [n for _, n in tail.calls]


def submit(b: Batcher, *jobs: Job) -> list[asyncio.Future]:
    return [asyncio.ensure_future(b.submit(j)) for j in jobs]


# ------------------------------------------------------------------------------------------ the policy


def test_while_a_batch_computes_queued_jobs_wait_max_delay_for_companions():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=8, max_delay_s=0.010, workers=2)
        first = submit(b, job(0))
        await turn()
        assert len(pool.pending) == 1  # every worker idle: it went at once, nobody waited
        rest = submit(b, job(1), job(2))
        await turn()
        clock.advance(0.009)
        await turn()
        assert len(pool.pending) == 1 and b.depth == 2  # a batch computes: the others wait for companions
        clock.advance(0.001)
        await turn()
        assert len(pool.pending) == 2 and b.depth == 0  # max_delay after the oldest arrived: they go
        pool.finish()
        out = await asyncio.gather(*first, *rest)
        await b.close()
        return out, tail

    out, tail = run(scenario())
    assert sizes(tail) == [1, 2] and [r.batch for r in out] == [1, 2, 2]
    assert out[1].queue_s == pytest.approx(0.010) and out[2].queue_s == pytest.approx(0.010)
    for i, r in enumerate(out):
        np.testing.assert_array_equal(r.logits, np.full((1, 2), i * 10.0 + 3))


def test_a_full_batch_goes_without_waiting_and_no_run_exceeds_max_batch():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=4, max_delay_s=1.0, workers=2)
        first = submit(b, job(0))
        await turn()
        rest = submit(b, *(job(i) for i in range(1, 6)))
        await turn()  # no time passes: four of the five make a full batch at once
        assert len(pool.pending) == 2 and b.depth == 1
        pool.finish()
        await turn()
        assert b.depth == 0 and len(pool.pending) == 1  # the fifth: a worker is idle again, nothing runs
        pool.finish()
        await asyncio.gather(*first, *rest)
        await b.close()
        return tail

    assert sizes(run(scenario())) == [1, 4, 1]


def test_batches_never_mix_keys_take_the_oldest_key_first_and_count_samples():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=8, max_delay_s=0.02, workers=1)
        first = submit(b, job(0, key=IN))
        await turn()  # holds the only worker
        rest = submit(b, job(1, key=F3, samples=3), job(2, key=F5, samples=2), job(3, key=F3, samples=3),
                      job(4, key=IN, samples=1), job(5, key=F3, samples=3))
        await turn()
        for _ in range(5):
            pool.finish()
            await turn()
        out = await asyncio.gather(*first, *rest)
        await b.close()
        return out, tail

    out, tail = run(scenario())
    # 3 + 3 samples of F3 (a third job would make 9 > 8), then the next oldest key each time
    assert tail.calls == [(IN, 1), (F3, 6), (F5, 2), (IN, 1), (F3, 3)]
    assert [r.logits.shape[0] for r in out[1:]] == [3, 2, 3, 1, 3]
    np.testing.assert_array_equal(out[2].logits, np.full((2, 2), 25.0))
    np.testing.assert_array_equal(out[4].logits, np.full((1, 2), 40.0))


def test_batching_off_runs_every_request_alone():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=1, max_delay_s=0.05, workers=1)
        futures = submit(b, *(job(i) for i in range(6)))
        while len(tail.calls) < 6:
            await turn()
            pool.finish()
        await asyncio.gather(*futures)
        await b.close()
        return tail

    assert sizes(run(scenario())) == [1] * 6


def test_what_is_queued_is_shared_among_idle_workers():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=8, max_delay_s=0.01, workers=2)
        futures = submit(b, *(job(i) for i in range(4)))
        await turn()
        assert len(pool.pending) == 1 and b.depth == 2  # half of what was queued, not all of it on one worker
        clock.advance(0.01)
        await turn()
        assert len(pool.pending) == 2 and b.depth == 0
        pool.finish()
        await asyncio.gather(*futures)
        await b.close()
        return tail

    assert sizes(run(scenario())) == [2, 2]


@pytest.mark.parametrize(("run_s", "expected"), [(LINGER_FACTOR * 0.01 + 0.05, [1, 2]), (0.0, [1, 1, 1])])
def test_after_a_long_run_an_idle_worker_waits_for_its_callers_next_requests(run_s, expected):
    """Job 2 waits while job 1 runs; job 1's caller sends job 3 shortly after its answer. After a long run (at
    least LINGER_FACTOR x max_delay) the worker waits max_delay for it, so jobs 2 and 3 share a run; after a
    short one it goes at once."""

    async def scenario():
        b, clock, pool, tail = policy(FakeTail(run_s=run_s), max_batch_size=8, max_delay_s=0.01, workers=1)
        first = submit(b, job(1))
        await turn()
        second = submit(b, job(2))
        await turn()
        pool.finish()  # job 1's run takes run_s
        await first[0]
        await turn()
        clock.advance(0.003)  # the caller's round trip, well inside max_delay
        third = submit(b, job(3))
        await turn()
        clock.advance(0.007)  # max_delay after job 1's run ended
        await turn()
        pool.finish()
        await turn()
        pool.finish()
        out = await asyncio.gather(*second, *third)
        await b.close()
        return out, tail

    (second, third), tail = run(scenario())
    np.testing.assert_array_equal(third.logits, np.full((1, 2), 33.0))
    assert sizes(tail) == expected
    assert second.compute_s == pytest.approx(run_s)


def test_full_queue_is_refused_at_once():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=1, max_delay_s=0, max_queue=3, workers=1)
        first = submit(b, job(0))
        await turn()  # running: it holds the only worker
        queued = submit(b, *(job(i) for i in range(1, 4)))
        await turn()
        assert b.depth == 3
        with pytest.raises(Overloaded, match="queue full"):
            await b.submit(job(99))
        while pool.pending:
            pool.finish()
            await turn()
        results = await asyncio.gather(*first, *queued)
        await b.close()
        return results, tail

    results, tail = run(scenario())
    assert len(results) == 4 and sizes(tail) == [1, 1, 1, 1]


def test_expired_requests_are_dropped_before_compute():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=1, max_delay_s=0, workers=1)
        blocker = submit(b, job(0))
        await turn()
        late, timely = submit(b, job(7, timeout_s=0.01), job(8, timeout_s=1.0))
        await turn()
        clock.advance(0.02)  # the first deadline passes while the worker is busy
        pool.finish()
        await turn()
        pool.finish()
        out = await asyncio.gather(*blocker, late, timely, return_exceptions=True)
        await b.close()
        return out, tail

    (_, late, timely), tail = run(scenario())
    assert isinstance(late, DeadlineExceeded) and "in the queue" in str(late)
    np.testing.assert_array_equal(timely.logits, np.full((1, 2), 83.0))
    assert sizes(tail) == [1, 1]  # the late job never ran


def test_close_answers_queued_requests_then_refuses_new_ones():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=2, max_delay_s=0, workers=1)
        pending = submit(b, *(job(i) for i in range(5)))
        await turn()
        closing = asyncio.ensure_future(b.close())
        await turn()
        with pytest.raises(Unavailable):
            await b.submit(job(9))
        assert not closing.done()  # queued requests are still to be answered
        while not closing.done():
            pool.finish()
            await turn()
        return await asyncio.gather(*pending), tail

    results, tail = run(scenario())
    assert len(results) == 5 and sizes(tail) == [2, 2, 1]  # by max_batch, in order


def test_a_bad_payload_fails_only_its_own_request():
    async def scenario():
        b, clock, pool, tail = policy(max_batch_size=8, max_delay_s=0.05, workers=1)
        first = submit(b, job(0))
        await turn()
        rest = submit(b, job(1), job(2, fail=True), job(3))
        await turn()
        pool.finish()
        await turn()
        pool.finish()
        out = await asyncio.gather(*rest, return_exceptions=True)
        await first[0]
        await b.close()
        return out, tail

    (ok1, bad, ok3), tail = run(scenario())
    assert isinstance(bad, InvalidInput) and "bad payload 2" in str(bad)
    np.testing.assert_array_equal(ok1.logits, [[13.0, 13.0]])
    np.testing.assert_array_equal(ok3.logits, [[33.0, 33.0]])
    assert tail.calls[-1] == (F3, 2)  # one run for the two good ones


def test_invalid_bounds_are_refused():
    with pytest.raises(ValueError):
        Batcher(FakeTail(), None, max_batch_size=0)


# ---------------------------------------------------------------------------- staged (half-decoded) inputs


class FakeSynth:
    """A batched second decoding stage: doubles the rows; fails on any row holding 99."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        self.calls.append(int(rows.shape[0]))
        if (rows == 99).any():
            raise InvalidInput("cannot synthesize 99")
        return torch.from_numpy(rows * 2)


def staged_job(value: float, synth: FakeSynth) -> Job:
    def check(x: torch.Tensor) -> torch.Tensor:
        if (x == 2 * 7).any():
            raise InvalidInput("decoded 7 is out of range")
        return x

    def prepare() -> Staged:
        return Staged(group="synth", rows=np.full((1, 2), value, dtype=np.float32), finish=synth, check=check)

    return Job(key=F3, samples=1, prepare=prepare)


def _behind_a_held_batch(tail: FakeTail, jobs: list[Job]) -> list:
    """Submit ``jobs`` while a first batch holds the only worker, so they form one batch together."""

    async def scenario():
        b, clock, pool, _ = policy(tail, max_batch_size=8, max_delay_s=5.0, workers=1)
        first = submit(b, job(0))
        await turn()
        rest = submit(b, *jobs)
        await turn()
        pool.finish()
        await turn()
        pool.finish()
        out = await asyncio.gather(*first, *rest, return_exceptions=True)
        await b.close()
        return out[1:]

    return run(scenario())


def test_staged_inputs_of_a_batch_are_finished_in_one_call_and_checked_per_job():
    tail, synth = FakeTail(), FakeSynth()
    ok1, bad, ok3 = _behind_a_held_batch(tail, [staged_job(1, synth), staged_job(7, synth), staged_job(3, synth)])
    assert synth.calls == [3]  # one call for the three payloads
    assert isinstance(bad, InvalidInput) and "out of range" in str(bad)
    np.testing.assert_array_equal(ok1.logits, [[23.0, 23.0]])  # 1 * 2 * 10 + 3
    np.testing.assert_array_equal(ok3.logits, [[63.0, 63.0]])
    assert tail.calls[-1] == (F3, 2)  # the tail ran once on the two good ones


def test_a_failed_joint_finish_is_retried_per_job_so_only_the_culprit_fails():
    tail, synth = FakeTail(), FakeSynth()
    ok1, bad, ok3 = _behind_a_held_batch(tail, [staged_job(1, synth), staged_job(99, synth), staged_job(3, synth)])
    assert synth.calls == [3, 1, 1, 1]
    assert isinstance(bad, InvalidInput) and "99" in str(bad)
    np.testing.assert_array_equal(ok1.logits, [[23.0, 23.0]])
    np.testing.assert_array_equal(ok3.logits, [[63.0, 63.0]])


# --------------------------------------------------------- real threads and the real clock (concurrency)


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows():
    tail = FakeTail()

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=4, max_delay_s=0.05, workers=1)
            b.start()
            results = await asyncio.gather(*(b.submit(job(i)) for i in range(10)))
            await b.close()
        return results

    results = run(scenario())
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.logits, np.full((1, 2), i * 10.0 + 3))
    counts = sizes(tail)
    assert sum(counts) == 10 and max(counts) <= 4 and len(counts) <= 4  # batched, never above the bound
    assert max(r.batch for r in results) > 1


class HoldZeroTail(FakeTail):
    """A FakeTail that holds only the batches of job 0 at its gate."""

    def __call__(self, key, x):
        if float(x[0, 0]) != 0:
            self.calls.append((key, int(x.shape[0])))
            return (x.reshape(x.shape[0], -1) * 10 + key.split).numpy()
        return super().__call__(key, x)


def test_max_delay_is_waited_on_the_real_event_loop_timer():
    """The real clock's timer: with a batch running, a queued job waits about max_delay, not forever and not
    for the running batch."""
    tail = HoldZeroTail()

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(tail, pool, max_batch_size=8, max_delay_s=0.05, workers=2)
            tail.gate.clear()
            first = asyncio.ensure_future(b.submit(job(0)))
            while not b._running:
                await asyncio.sleep(0.001)
            second = await asyncio.wait_for(b.submit(job(1)), 5.0)  # the first is still held
            tail.gate.set()
            await first
            await b.close()
        return second

    second = run(scenario())
    assert 0.04 <= second.queue_s < 2.0 and second.batch == 1


class ThreadRecordingTail(FakeTail):
    """A FakeTail that also records which thread ran each batch."""

    def __init__(self):
        super().__init__()
        self.threads: list[str] = []

    def __call__(self, key, x):
        self.threads.append(threading.current_thread().name)
        return super().__call__(key, x)


def test_a_lone_short_job_runs_on_the_event_loop_once_its_compute_is_known():
    tail = ThreadRecordingTail()

    async def scenario():
        with ThreadPoolExecutor(1, thread_name_prefix="tail") as pool:
            b = Batcher(tail, pool, max_batch_size=8, max_delay_s=0.0, workers=1, inline_max_s=1.0)
            results = [await b.submit(job(i)) for i in range(4)]  # one at a time: the server is idle each time
            await b.close()
        return b, results, threading.current_thread().name

    b, results, loop_thread = run(scenario())
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.logits, np.full((1, 2), i * 10.0 + 3))
    assert tail.threads[0].startswith("tail")  # nothing measured yet: the first run goes to a worker
    assert tail.threads[1:] == [loop_thread] * 3 and b.inline_runs == 3


def test_queued_jobs_go_to_the_workers_and_long_or_disabled_ones_never_run_inline():
    def scenario(inline_max_s: float, sequential: bool):
        tail = ThreadRecordingTail()

        async def go():
            with ThreadPoolExecutor(1, thread_name_prefix="tail") as pool:
                b = Batcher(tail, pool, max_batch_size=2, max_delay_s=0.0, workers=1, inline_max_s=inline_max_s)
                await b.submit(job(0))
                b._single_s = 0.5  # measured: 0.5 s per one-sample run
                if sequential:
                    for i in range(3):
                        await b.submit(job(i))
                else:  # several queued at once: a batch for the worker, whatever its size
                    await asyncio.gather(*(b.submit(job(i)) for i in range(6)))
                await b.close()
            return b

        b = run(go())
        return b.inline_runs, tail.threads

    runs, threads = scenario(inline_max_s=1.0, sequential=False)
    # the first of the burst may find the server quiet and run at once in submit; the rest queue for a worker
    assert runs <= 1 and sum(not t.startswith("tail") for t in threads) == runs
    assert threads[-1].startswith("tail") and len(threads) <= 1 + 1 + runs + 3  # batches of 2, not one by one
    runs, threads = scenario(inline_max_s=0.1, sequential=True)  # 0.5 s per run > 0.1 s: too long
    assert runs == 0 and all(t.startswith("tail") for t in threads)
    runs, threads = scenario(inline_max_s=0.0, sequential=True)  # off
    assert runs == 0 and all(t.startswith("tail") for t in threads)


def test_an_inline_failure_fails_only_that_request():
    tail = FakeTail()

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=8, max_delay_s=0.0, workers=1, inline_max_s=1.0)
            await b.submit(job(0))
            with pytest.raises(InvalidInput, match="bad payload 1"):
                await b.submit(job(1, fail=True))
            ok = await b.submit(job(2))
            await b.close()
        return b, ok

    b, ok = run(scenario())
    np.testing.assert_array_equal(ok.logits, np.full((1, 2), 23.0))
    assert b.inline_runs == 2


def test_at_a_quiet_server_a_short_job_runs_within_submit_and_one_right_after_a_run_queues():
    async def scenario():
        b, clock, pool, _tail = policy(max_batch_size=8, max_delay_s=0.0, workers=1, inline_max_s=1.0)
        first = submit(b, job(0))  # nothing measured yet: a worker runs it
        await turn()
        pool.finish()
        await turn()
        assert first[0].result().batch == 1 and b.inline_runs == 0
        clock.advance(2 * QUIET_S)  # quiet since that run ended
        coro = b.submit(job(1))
        with pytest.raises(StopIteration) as done:  # answered without yielding to the event loop once
            coro.send(None)
        np.testing.assert_array_equal(done.value.value.logits, np.full((1, 2), 13.0))
        assert b.inline_runs == 1
        second = job(2)  # no time has passed since that run: a burst may be arriving, so it queues
        coro = b.submit(second)
        coro.send(None)  # suspended: waiting for the batch-forming task
        assert b.inline_runs == 1 and b.depth == 1
        await turn()  # the task runs it (inline: alone, short, nothing else queued)
        np.testing.assert_array_equal(second.future.result().logits, np.full((1, 2), 23.0))
        assert b.inline_runs == 2 and not pool.pending
        coro.close()
        await b.close()

    run(scenario())


def test_a_job_that_missed_a_batch_of_several_is_not_held_for_the_next_callers():
    """Jobs 1 and 2 run together (a long run); job 3 arrives meanwhile. After the run, job 3 has waited most of
    it: the worker does not linger for the answered callers' next jobs (4 and 5), which would make job 3 wait
    for a second batch of three; it runs at once, and 4 and 5 share the next run."""

    async def scenario():
        b, clock, pool, tail = policy(FakeTail(run_s=0.15), max_batch_size=8, max_delay_s=0.01, workers=1)
        first = submit(b, job(1), job(2))
        await turn()
        late = submit(b, job(3))
        await turn()
        pool.finish()  # jobs 1 and 2: 0.15 s
        await asyncio.gather(*first)
        await turn()
        assert len(pool.pending) == 1  # job 3 went without waiting for companions
        clock.advance(0.003)  # the callers of 1 and 2 send again, inside max_delay
        nxt = submit(b, job(4), job(5))
        await turn()
        pool.finish()
        await turn()
        clock.advance(0.01)
        await turn()
        pool.finish()
        out = await asyncio.gather(*late, *nxt)
        await b.close()
        return out, tail

    (late, *_), tail = run(scenario())
    assert sizes(tail) == [2, 1, 2]
    assert late.queue_s == pytest.approx(0.15)
