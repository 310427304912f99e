"""Keep torch's OpenMP thread teams within the machine's cores, so that compute threads keep spin-waiting.

Why this exists (measured: ``python -m bench.omp_teams``). torch's CPU kernels (and oneDNN's convolutions) run
their intra-op parallel regions on GNU OpenMP (libgomp). libgomp keeps **one team of worker threads per thread
that enters a parallel region**: the main thread has its team, every other Python thread that runs a
multi-threaded op gets its own, and a team lives as long as the thread that owns it. Between two parallel
regions a team's threads spin-wait for the next one (~300,000 iterations) and only then sleep on a futex —
unless libgomp counts more threads in its teams than the CPUs it may use: then it *throttles* the spin to ~100
iterations, and every thread sleeps after each of the hundreds of small parallel regions of a forward pass and
must be woken by a system call for the next. On this 2-core machine ResNet-50's tail after ``layer2`` (2 intra-op
threads) took ~40 ms on a process's only team and ~60 ms as soon as a second 2-thread team existed anywhere in the
process (the same ops; ~360 voluntary context switches per run instead of ~0). That was the cloud server's
"heavy tail is 1.5x slower in a worker thread": the model was loaded in one thread (``asyncio.to_thread``: its
shape propagation ran convolutions there, so that thread got a team that never went away) and computed in
another.

The rules the daemons follow (this module is how):

* torch work of a daemon runs on its compute threads only; one-off torch work (loading a bundle, warming it up)
  runs in :func:`run_in_own_thread` (or :func:`call_in_own_thread`, synchronous): a fresh thread that **exits**
  afterwards, which releases its team. The edge agent loads its bundle so when its head uses more than one
  intra-op thread (its default is 1: no teams at all).
* ``workers x intra-op threads`` should not exceed the usable cores (:func:`oversubscribed`); the cloud server
  picks its default intra-op threads that way and warns when the settings oversubscribe.
* a short job may run on the event loop only when the intra-op threads are 1 (then no team is created).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(workers: int, cpus: int | None = None) -> int:
    """Intra-op threads per compute thread so that ``workers`` of them fill the cores without oversubscribing."""
    return max(1, (usable_cpus() if cpus is None else cpus) // max(1, workers))


def oversubscribed(workers: int, threads: int, cpus: int | None = None) -> bool:
    """Whether ``workers`` compute threads of ``threads`` intra-op threads each exceed the usable CPUs (with more
    than one thread per team: single-thread workers create no OpenMP teams)."""
    return threads > 1 and workers * threads > (usable_cpus() if cpus is None else cpus)


async def run_in_own_thread(fn: Callable[..., T], *args: object, name: str = "oneshot") -> T:
    """Run ``fn(*args)`` in a new thread that ends when it returns, and await its result (or exception).

    Unlike :func:`asyncio.to_thread`, whose pooled thread lives on with whatever OpenMP team the call created,
    the thread ends here, and libgomp releases its team with it (see the module docstring).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (fn(*args), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return await future


def call_in_own_thread(fn: Callable[..., T], *args: object, name: str = "oneshot") -> T:
    """Synchronous :func:`run_in_own_thread`: run ``fn(*args)`` in a new thread, wait for it to end (its OpenMP
    team goes with it) and return its result or raise its exception."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
