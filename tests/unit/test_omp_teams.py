"""splitinfer.omp_teams: one-shot threads that end (so their OpenMP team goes), and the thread-count rules."""

from __future__ import annotations

import asyncio
import threading

import pytest

from splitinfer.omp_teams import (
    call_in_own_thread,
    default_threads,
    oversubscribed,
    run_in_own_thread,
    usable_cpus,
)


def test_run_in_own_thread_returns_and_the_thread_ends():
    seen: list[str] = []

    def work(a: int, b: int) -> int:
        seen.append(threading.current_thread().name)
        return a + b

    async def main() -> int:
        return await run_in_own_thread(work, 2, 3, name="probe-load")

    assert asyncio.run(main()) == 5
    assert seen == ["probe-load"]  # not the caller's thread, not a pooled one
    for t in threading.enumerate():
        if t.name == "probe-load":
            t.join(timeout=5)
    assert not [t for t in threading.enumerate() if t.name == "probe-load"]


def test_run_in_own_thread_raises_the_callers_exception():
    def boom() -> None:
        raise ValueError("bad bundle")

    async def main() -> None:
        await run_in_own_thread(boom)

    with pytest.raises(ValueError, match="bad bundle"):
        asyncio.run(main())


def test_thread_count_rules():
    assert default_threads(1, cpus=2) == 2
    assert default_threads(2, cpus=2) == 1
    assert default_threads(4, cpus=2) == 1  # never 0
    assert default_threads(2, cpus=8) == 4
    assert default_threads(1) == usable_cpus()
    assert not oversubscribed(2, 1, cpus=2)  # single-thread workers create no OpenMP teams
    assert not oversubscribed(1, 2, cpus=2)
    assert oversubscribed(2, 2, cpus=2)
    assert oversubscribed(1, 4, cpus=2)


def test_call_in_own_thread_is_the_synchronous_form():
    names: list[str] = []

    def work(x: int) -> int:
        names.append(threading.current_thread().name)
        return 2 * x

    assert call_in_own_thread(work, 21, name="probe-sync") == 42
    assert names == ["probe-sync"] and not [t for t in threading.enumerate() if t.name == "probe-sync"]
    with pytest.raises(KeyError):
        call_in_own_thread(lambda: {}["missing"])
