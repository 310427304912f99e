"""Dynamic batching of tail runs: a bounded queue per served model, batches formed per (input kind, split).

Requests are :class:`Job` objects: a cheap validated ``prepare`` callable that decodes the payload into a
``[B, *boundary]`` float tensor (run in a worker thread), the number of samples it carries and a deadline.
One asyncio task per :class:`Batcher` forms batches:

1. It waits for a free worker (``workers`` batches run at once in the thread pool) and a queued job.
2. The oldest job fixes the :class:`BatchKey` (features at a split, or a full-model input); jobs with the same key
   join in arrival order until ``max_batch_size`` samples, or until ``max_delay_s`` has passed since the
   oldest job arrived — but only while another batch is computing: with every worker idle the queue is
   dispatched at once (waiting would only add latency), except right after a long run (at least
   ``LINGER_FACTOR`` x ``max_delay_s``) has ended: then the worker waits until ``max_delay_s`` after its end
   for the next requests of the callers it just answered, so they share a run. What is queued is shared
   among idle workers (at most ``ceil(queued / idle workers)`` samples per batch) instead of piling onto one
   thread. Jobs with other keys keep their place in the queue.
3. Jobs whose deadline passed while queued, or whose caller gave up, are dropped before any compute:
   their futures get :class:`~splitinfer.errors.DeadlineExceeded`.
4. In the worker thread each job is decoded on its own (a bad payload fails that job only), the tensors
   are concatenated, the tail runs once, and the logits are split back per job. A job may decode only half
   way (:class:`Staged`: e.g. the learned bottleneck's entropy-decoded symbols): the halves of one group are
   finished in one call (the bottleneck's decoder network runs once for the batch), then checked per job.

``max_batch_size=1`` turns batching off (each job runs alone, through the same queue). A full queue
refuses the job at once with :class:`~cloud_server.errors.Overloaded` (RESOURCE_EXHAUSTED).

**Inline runs at low load** (``inline_max_s`` > 0). Handing a job to a worker thread costs far more than the
hand-off itself when the model is short: the worker's many small torch ops and the event loop take turns on
the GIL. So when the server is idle — no batch running, the batch is one single-sample job, nothing else
queued — and one-sample runs have taken at most ``inline_max_s`` (running mean), the job runs on the event loop
itself. After such a run the loop yields ``INLINE_YIELDS`` times before forming the next batch, so that gRPC
delivers the requests that arrived meanwhile (it hands over one new call per loop iteration); if several are
then waiting, they form a batch for the worker threads as usual. The loop is blocked at most about
``inline_max_s`` at a time; long models never run inline. When such a job arrives at a quiet server (nothing
queued or running, the batch-forming task parked, no run ended in the last ``QUIET_S``: a lone client, not a
burst), ``submit`` runs it at once in the caller's own coroutine instead of waking the batch-forming task, which
saves two event-loop turns of latency; a job arriving within ``QUIET_S`` of another job or of a run goes through
the queue as above, so a burst still forms batches and meets the per-client limits (its calls arrive back to
back; a lone client's arrive a round trip apart).

**Time** comes from a :class:`Clock` (``now()`` and a timer on the event loop): :class:`LoopClock` by default;
tests give a fake one and decide when each batch's compute ends, so the batching policy (max delay, max batch,
linger, deadlines) is checked without real sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from cloud_server.decode import Staged, finish_prepared
from cloud_server.errors import Overloaded
from splitinfer import wire
from splitinfer.errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

INLINE_YIELDS = 8  # event-loop turns after an inline run before the next batch is formed (see the docstring)
QUIET_S = 1e-3  # a job submitted this long after the last arrival and the last run may run at once (see the docstring)
LINGER_FACTOR = 10  # an idle worker lingers (max_delay) after a run at least this many max_delays long


@dataclass(frozen=True, slots=True)
class BatchKey:
    """What the jobs of one tail run share: the kind of input and the boundary the tail starts at.

    One batcher serves one model version, so the model is not part of the key; nor is the codec: each job
    decodes its own payload, and features of different codecs at one split run as one batch."""

    kind: str  # wire.FEATURES_TENSOR (split features) or wire.INPUT_TENSOR (a full-model input)
    split: int  # the tail runs stages split..N-1 (0 for an input)

    @classmethod
    def features(cls, split: int) -> BatchKey:
        """Split features decoded at boundary ``split``."""
        return cls(wire.FEATURES_TENSOR, split)

    @classmethod
    def model_input(cls) -> BatchKey:
        """A normalised model input: the whole model runs."""
        return cls(wire.INPUT_TENSOR, 0)


class Timer(Protocol):
    def cancel(self) -> object: ...


class Clock(Protocol):
    """The batcher's time: ``now()`` in seconds (any origin), and ``call_later`` on the running event loop."""

    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer: ...


class LoopClock:
    """The real clock: ``time.perf_counter`` and the running event loop's timers."""

    now = staticmethod(time.perf_counter)

    @staticmethod
    def call_later(delay: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


@dataclass
class RunResult:
    """What one job got back: its logits, the time it queued, and the batch it ran in."""

    logits: np.ndarray
    queue_s: float
    compute_s: float
    batch: int


@dataclass
class Job:
    """One request waiting for the tail."""

    key: BatchKey
    samples: int
    prepare: Callable[[], torch.Tensor | Staged]
    timeout_s: float | None = None  # the answer is useless this long after submit (None: no deadline)
    arrived: float = 0.0  # clock time of submit (set by Batcher.submit)
    deadline: float | None = None  # clock time after which the answer is useless (set by Batcher.submit)
    future: asyncio.Future | None = None


class Batcher:
    """Queue + batch former + dispatcher for one served model (see the module docstring)."""

    def __init__(self, run_batch: Callable[[BatchKey, torch.Tensor], np.ndarray], executor: Executor, *,
                 max_batch_size: int = 32, max_delay_s: float = 0.001, max_queue: int = 256, workers: int = 1,
                 on_queue_depth: Callable[[int], None] | None = None,
                 on_batch: Callable[[int, float], None] | None = None, inline_max_s: float = 0.0,
                 clock: Clock | None = None):
        if max_batch_size < 1 or max_queue < 1 or workers < 1 or max_delay_s < 0 or inline_max_s < 0:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1, max_delay_s and inline_max_s "
                             ">= 0")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.workers = workers
        self.on_queue_depth = on_queue_depth
        self.on_batch = on_batch
        self.clock: Clock = clock or LoopClock()
        self._queue: deque[Job] = deque()
        self._changed: asyncio.Event | None = None  # a job arrived or a batch ended: the loop looks again
        self._progress: asyncio.Event | None = None  # a batch ended or the queue emptied: close() looks again
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._closed = False
        self.inline_max_s = inline_max_s
        self.inline_runs = 0  # batches run on the event loop (see the module docstring)
        self._single_s: float | None = None  # running mean of the compute seconds of one-sample runs
        self._last_compute_s = 0.0  # compute seconds of the last run
        self._last_jobs = 0  # jobs in the last run
        self._last_done = 0.0  # clock time when the last worker batch ended
        self._last_inline_done = float("-inf")  # clock time when the last inline run ended
        self._last_submit = float("-inf")  # clock time of the last submit
        self._parked = False  # the batch-forming task waits for a job with nothing queued or running

    # ------------------------------------------------------------------------------------------- public

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the batch-forming task on the running event loop."""
        if self._task is None:
            self._changed = asyncio.Event()
            self._progress = asyncio.Event()
            self._slots = asyncio.Semaphore(self.workers)
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def submit(self, job: Job) -> RunResult:
        """Queue ``job`` and wait for its result; raises what its compute raised."""
        if self._closed:
            raise Unavailable("model is being unloaded; retry on another replica")
        if self._task is None:
            self.start()
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"batch queue full ({self.max_queue} requests waiting); retry later")
        job.future = asyncio.get_running_loop().create_future()
        job.arrived = self.clock.now()
        job.deadline = None if job.timeout_s is None else job.arrived + max(0.0, job.timeout_s)
        previous, self._last_submit = self._last_submit, job.arrived
        if self._runs_at_once(job, previous):
            try:
                self._run_inline([job])
            finally:
                self._progress.set()
            return job.future.result()
        self._queue.append(job)
        self._report_depth()
        self._changed.set()
        return await job.future

    async def close(self) -> None:
        """Refuse new jobs, let queued and running ones finish, then stop the task."""
        self._closed = True
        while self._queue or self._running:
            self._progress.clear()
            self._changed.set()
            await self._progress.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -------------------------------------------------------------------------------------------- loop

    def _report_depth(self) -> None:
        if self.on_queue_depth is not None:
            self.on_queue_depth(len(self._queue))

    async def _wait_changed(self, timeout: float | None) -> None:
        """Wait until a job arrives or a batch ends, or ``timeout`` passes (a timer, not ``wait_for``: no task
        per wait on this per-request path)."""
        self._changed.clear()
        timer = None if timeout is None else self.clock.call_later(timeout, self._changed.set)
        try:
            await self._changed.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _drop_stale(self) -> None:
        """Answer queued jobs that expired or were abandoned, before they cost anything."""
        now = self.clock.now()
        if not any(job.future.done() or (job.deadline is not None and now >= job.deadline) for job in self._queue):
            return
        kept: deque[Job] = deque()
        for job in self._queue:
            if job.future.done():  # the caller was cancelled
                continue
            if job.deadline is not None and now >= job.deadline:
                job.future.set_exception(DeadlineExceeded(
                    f"deadline passed after {1e3 * (now - job.arrived):.1f} ms in the queue; not computed"))
                continue
            kept.append(job)
        self._queue = kept

    def _same_key_samples(self, key: BatchKey) -> int:
        return sum(j.samples for j in self._queue if j.key == key)

    def _take(self, limit: int) -> list[Job]:
        """Remove and return the next batch: the oldest job plus same-key jobs up to ``limit`` samples."""
        first = self._queue.popleft()
        batch, total = [first], first.samples
        rest: deque[Job] = deque()
        for job in self._queue:
            if job.key == first.key and total + job.samples <= limit:
                batch.append(job)
                total += job.samples
            else:
                rest.append(job)
        self._queue = rest
        return batch

    async def _loop(self) -> None:
        while True:
            self._drop_stale()
            if not self._queue:
                self._progress.set()
                self._parked = not self._running
                try:
                    await self._wait_changed(None)
                finally:
                    self._parked = False
                continue
            await self._slots.acquire()
            try:
                # Fill: while another batch computes, wait until the oldest job's key has a full batch or
                # its delay ran out. With every worker idle, waiting would only add latency: go now, unless a
                # long batch just ended (see _linger_s).
                while True:
                    self._drop_stale()
                    if not self._queue:
                        break
                    oldest = self._queue[0]
                    now = self.clock.now()
                    if self._closed or self._same_key_samples(oldest.key) >= self.max_batch_size:
                        break
                    left = (oldest.arrived + self.max_delay_s - now if self._running
                            else self._linger_s(now, oldest))
                    if left <= 0:
                        break
                    await self._wait_changed(left)
                if not self._queue:
                    self._slots.release()
                    continue
                # Share what is queued among the idle workers rather than piling it on one.
                idle = self.workers - len(self._running)
                limit = max(1, -(-self._same_key_samples(self._queue[0].key) // max(1, idle)))
                batch = self._take(min(limit, self.max_batch_size))
                self._report_depth()
            except BaseException:
                self._slots.release()
                raise
            if self._runs_inline(batch):
                try:
                    self._run_inline(batch)
                finally:
                    self._slots.release()
                    self._progress.set()
                for _ in range(INLINE_YIELDS):  # let gRPC hand over the calls that arrived meanwhile
                    await asyncio.sleep(0)
                continue
            task = asyncio.get_running_loop().create_task(self._dispatch(batch))
            self._running.add(task)
            task.add_done_callback(self._dispatch_ended)

    def _dispatch_ended(self, task: asyncio.Task) -> None:
        """For a task cancelled before it ran (``_dispatch`` removes itself when it ends normally)."""
        self._running.discard(task)
        self._progress.set()

    def _linger_s(self, now: float, oldest: Job) -> float:
        """How much longer an idle worker waits for companions of the queued jobs: up to ``max_delay_s`` after a
        batch that took at least ``LINGER_FACTOR`` times that long has ended, since its callers are about to send
        their next requests. Without it, two clients of a long model fall into turns (each request waits for
        the other's run alone) instead of sharing one run; the wait costs a few percent of such a run.

        Not after a run of several jobs when the oldest queued job has already waited half that run: it missed
        that batch, and joining the next one with the callers just answered would make it wait two full batches
        (the heavy tail's p99 at 4-8 clients was twice its p50 that way); it goes at once with what is queued."""
        if self._last_compute_s < LINGER_FACTOR * self.max_delay_s:
            return 0.0
        if self._last_jobs > 1 and now - oldest.arrived >= 0.5 * self._last_compute_s:
            return 0.0
        return self._last_done + self.max_delay_s - now

    def _runs_inline(self, batch: list[Job]) -> bool:
        """Idle server, one short job: run it on the event loop (see the module docstring)."""
        return (self.inline_max_s > 0 and not self._running and not self._queue and len(batch) == 1
                and batch[0].samples == 1 and self._single_s is not None and self._single_s <= self.inline_max_s)

    def _runs_at_once(self, job: Job, previous_submit: float) -> bool:
        """A short one-sample job at a quiet server runs in ``submit`` itself (see the module docstring)."""
        return (self._parked and not self._closed and not self._queue and not self._running
                and (job.deadline is None or job.deadline > job.arrived)
                and job.arrived - max(self._last_done, self._last_inline_done, previous_submit) >= QUIET_S
                and self._runs_inline([job]))

    def _run_inline(self, batch: list[Job]) -> None:
        started = self.clock.now()
        try:
            outcomes, compute_s, samples = self._compute(batch)
        except Exception as exc:  # noqa: BLE001 - _compute reports per job; this is a bug, fail the batch
            outcomes, compute_s, samples = [exc] * len(batch), 0.0, 0
        self.inline_runs += 1
        self._settle(batch, outcomes, compute_s, samples, started)
        self._last_inline_done = self.clock.now()

    async def _dispatch(self, batch: list[Job]) -> None:
        try:
            loop = asyncio.get_running_loop()
            started = self.clock.now()
            try:
                outcomes, compute_s, samples = await loop.run_in_executor(self.executor, self._compute, batch)
            except BaseException as exc:  # the whole batch failed (executor shut down, cancelled)
                outcomes, compute_s, samples = [exc] * len(batch), 0.0, 0
            self._settle(batch, outcomes, compute_s, samples, started)
        finally:
            self._last_done = self.clock.now()
            self._running.discard(asyncio.current_task())  # now, not in a later done-callback: the next batch
            self._slots.release()                           # formed may already count on it
            self._changed.set()
            self._progress.set()

    def _settle(self, batch: list[Job], outcomes: list[object], compute_s: float, samples: int,
                started: float) -> None:
        """Record the run and answer each job's future."""
        self._last_compute_s = compute_s
        self._last_jobs = len(batch)
        if samples == 1:
            self._single_s = compute_s if self._single_s is None else 0.8 * self._single_s + 0.2 * compute_s
        if samples and self.on_batch is not None:
            self.on_batch(samples, compute_s)
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(RunResult(logits=outcome, queue_s=started - job.arrived,
                                                compute_s=compute_s, batch=samples))

    def _compute(self, batch: list[Job]) -> tuple[list[object], float, int]:
        """Worker thread: decode each job, run the tail once on the concatenation, split the logits."""
        started = self.clock.now()
        prepared: list[object] = []
        for job in batch:
            try:
                prepared.append(job.prepare())
            except Exception as exc:  # noqa: BLE001 - reported to that job's caller, logged by the mapper
                prepared.append(exc)
        ready, outcomes = finish_prepared(prepared)
        ok = sorted(ready)
        tensors = [ready[i] for i in ok]
        samples = sum(int(t.shape[0]) for t in tensors)
        if tensors:
            x = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            key = batch[ok[0]].key
            try:  # payloads whose batch size shows only after decoding may exceed the bound: run in chunks
                if samples <= self.max_batch_size:
                    logits = self.run_batch(key, x)
                else:
                    logits = np.concatenate([self.run_batch(key, c) for c in torch.split(x, self.max_batch_size)])
            except Exception as exc:  # noqa: BLE001
                for i in ok:
                    outcomes[i] = exc
            else:
                offset = 0
                for i, t in zip(ok, tensors, strict=True):
                    n = int(t.shape[0])
                    outcomes[i] = logits[offset:offset + n]
                    offset += n
        return outcomes, self.clock.now() - started, samples

