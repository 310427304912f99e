"""The dynamic batcher with a fake tail: batch formation, isolation of failures, bounds, deadlines, close."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cloud_server.batcher import Batcher, Job, Staged
from cloud_server.errors import Overloaded
from splitinfer.errors import DeadlineExceeded, InvalidInput, Unavailable


class FakeTail:
    """Logits = input * 10 + split; records every batch it ran; can be held to let the queue build up."""

    def __init__(self):
        self.calls: list[tuple[tuple[str, int], int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, key, x: torch.Tensor) -> np.ndarray:
        self.gate.wait(10)
        self.calls.append((key, int(x.shape[0])))
        return (x.reshape(x.shape[0], -1) * 10 + key[1]).numpy()


def job(value: float, key=("features", 3), samples: int = 1, fail: bool = False, deadline=None) -> Job:
    def prepare() -> torch.Tensor:
        if fail:
            raise InvalidInput(f"bad payload {value}")
        return torch.full((samples, 2), float(value))

    return Job(key=key, samples=samples, prepare=prepare, deadline=deadline)


def run(coro):
    return asyncio.run(coro)


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
    sizes = [n for _, n in tail.calls]
    assert sum(sizes) == 10 and max(sizes) <= 4 and len(sizes) <= 4  # batched, never above the bound
    assert max(r.batch for r in results) > 1


def test_batching_off_runs_every_request_alone():
    tail = FakeTail()

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=1, max_delay_s=0.05)
            await asyncio.gather(*(b.submit(job(i)) for i in range(6)))
            await b.close()

    run(scenario())
    assert [n for _, n in tail.calls] == [1] * 6


def test_different_splits_are_never_mixed_and_multi_sample_requests_count_samples():
    tail = FakeTail()

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=8, max_delay_s=0.02)
            jobs = [job(1, key=("features", 3), samples=3), job(2, key=("features", 5), samples=2),
                    job(3, key=("features", 3), samples=3), job(4, key=("input", 0), samples=1),
                    job(5, key=("features", 3), samples=3)]
            out = await asyncio.gather(*(b.submit(j) for j in jobs))
            await b.close()
        return out

    out = run(scenario())
    assert [r.logits.shape[0] for r in out] == [3, 2, 3, 1, 3]
    np.testing.assert_array_equal(out[1].logits, np.full((2, 2), 25.0))
    np.testing.assert_array_equal(out[3].logits, np.full((1, 2), 40.0))
    assert all(n <= 8 for _, n in tail.calls)
    assert sum(n for k, n in tail.calls if k == ("features", 3)) == 9
    assert all(n <= 8 for k, n in tail.calls if k == ("features", 3))


def test_a_bad_payload_fails_only_its_own_request():
    tail = FakeTail()

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=8, max_delay_s=0.05)
            out = await asyncio.gather(b.submit(job(1)), b.submit(job(2, fail=True)), b.submit(job(3)),
                                       return_exceptions=True)
            await b.close()
        return out

    ok1, bad, ok3 = run(scenario())
    assert isinstance(bad, InvalidInput) and "bad payload 2" in str(bad)
    np.testing.assert_array_equal(ok1.logits, [[13.0, 13.0]])
    np.testing.assert_array_equal(ok3.logits, [[33.0, 33.0]])


def test_full_queue_is_refused_at_once():
    tail = FakeTail()
    tail.gate.clear()  # the first batch blocks the only worker: the rest queue up

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=1, max_delay_s=0, max_queue=3)
            first = asyncio.ensure_future(b.submit(job(0)))
            while not b._running:  # until the first job is running (and blocks the only worker)
                await asyncio.sleep(0.001)
            queued = [asyncio.ensure_future(b.submit(job(i))) for i in range(1, 4)]
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded, match="queue full"):
                await b.submit(job(99))
            tail.gate.set()
            results = await asyncio.gather(first, *queued)
            await b.close()
        return results

    assert len(run(scenario())) == 4


def test_expired_requests_are_dropped_before_compute():
    tail = FakeTail()
    tail.gate.clear()

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=1, max_delay_s=0)
            blocker = asyncio.ensure_future(b.submit(job(0)))
            while not b._running:
                await asyncio.sleep(0.001)
            late = asyncio.ensure_future(b.submit(job(7, deadline=time.perf_counter() + 0.01)))
            await asyncio.sleep(0.05)  # its deadline passes while the worker is busy
            tail.gate.set()
            out = await asyncio.gather(blocker, late, return_exceptions=True)
            await b.close()
        return out

    _, late = run(scenario())
    assert isinstance(late, DeadlineExceeded)
    assert all(n == 1 for _, n in tail.calls) and len(tail.calls) == 1  # the late job never ran


def test_close_answers_queued_requests_then_refuses_new_ones():
    tail = FakeTail()
    tail.gate.clear()

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=2, max_delay_s=0)
            pending = [asyncio.ensure_future(b.submit(job(i))) for i in range(5)]
            await asyncio.sleep(0.02)
            closing = asyncio.ensure_future(b.close())
            await asyncio.sleep(0.02)
            with pytest.raises(Unavailable):
                await b.submit(job(9))
            tail.gate.set()
            await closing
            return await asyncio.gather(*pending)

    results = run(scenario())
    assert len(results) == 5 and sum(n for _, n in tail.calls) == 5


def test_invalid_bounds_are_refused():
    with pytest.raises(ValueError):
        Batcher(FakeTail(), None, max_batch_size=0)


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

    return Job(key=("features", 3), samples=1, prepare=prepare)


def _behind_a_held_batch(tail: FakeTail, jobs: list[Job]) -> list:
    """Submit ``jobs`` while a first batch holds the only worker, so they form one batch together."""

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=8, max_delay_s=5.0, workers=1)
            tail.gate.clear()
            first = asyncio.ensure_future(b.submit(job(0)))
            while not tail.calls and b.depth == 0 and not b._running:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.02)
            rest = [asyncio.ensure_future(b.submit(j)) for j in jobs]
            await asyncio.sleep(0.02)
            tail.gate.set()
            out = await asyncio.gather(first, *rest, return_exceptions=True)
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
    assert tail.calls[-1] == (("features", 3), 2)  # the tail ran once on the two good ones


def test_a_failed_joint_finish_is_retried_per_job_so_only_the_culprit_fails():
    tail, synth = FakeTail(), FakeSynth()
    ok1, bad, ok3 = _behind_a_held_batch(tail, [staged_job(1, synth), staged_job(99, synth), staged_job(3, synth)])
    assert synth.calls == [3, 1, 1, 1]
    assert isinstance(bad, InvalidInput) and "99" in str(bad)
    np.testing.assert_array_equal(ok1.logits, [[23.0, 23.0]])
    np.testing.assert_array_equal(ok3.logits, [[63.0, 63.0]])


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
    assert runs == 0 and all(t.startswith("tail") for t in threads)
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


class SlowTail(FakeTail):
    """A FakeTail whose runs take ``seconds``."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def __call__(self, key, x):
        time.sleep(self.seconds)
        return super().__call__(key, x)


@pytest.mark.parametrize(("run_s", "expected"), [(0.15, [1, 2]), (0.0, [1, 1, 1])])
def test_after_a_long_run_an_idle_worker_waits_for_its_callers_next_requests(run_s, expected):
    """Job 2 waits while job 1 runs; job 1's caller sends job 3 shortly after its answer. After a long run (at
    least LINGER_FACTOR x max_delay) the worker waits max_delay for it, so jobs 2 and 3 share a run; after a
    short one it goes at once."""
    tail = SlowTail(run_s)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(tail, pool, max_batch_size=8, max_delay_s=0.01, workers=1)
            first = asyncio.ensure_future(b.submit(job(1)))
            await asyncio.sleep(0.005)  # job 1 is running
            second = asyncio.ensure_future(b.submit(job(2)))
            await first
            await asyncio.sleep(0.003)  # the caller's round trip, well inside max_delay
            third = await b.submit(job(3))
            await second
            await b.close()
        return third

    third = run(scenario())
    np.testing.assert_array_equal(third.logits, np.full((1, 2), 33.0))
    assert [n for _, n in tail.calls] == expected
