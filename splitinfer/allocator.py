"""Keep freed tensor memory in the process instead of returning it to the OS after every request.

glibc's malloc hands large blocks back to the kernel when they are freed (mmap'd blocks, and heap tops above
the trim threshold) and adapts those thresholds as it goes. A staged forward pass allocates and frees
activations of the same sizes on every request, so each request can page-fault its activations in again:
measured here on mobilenet_v2 at one thread, passes flip between 21 ms and 36 ms depending on the heap's state.
Fixing the thresholds (the effect of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, or of jemalloc or
tcmalloc, which PyTorch recommends for CPU inference) makes the steady state the only state. Both daemons and
the profiler call :func:`tune_allocator` at start-up, so profiles match what the daemons do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum on 64-bit: blocks above it are still mmap'd
TRIM_THRESHOLD_BYTES = 1 << 30
DISABLE_ENV = "SPLITINFER_KEEP_MALLOC_DEFAULTS"

_done: bool | None = None


def tune_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds (once per process); False when not glibc or disabled."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get(DISABLE_ENV) == "1":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not ok:
        log.debug("mallopt refused the thresholds; keeping malloc's defaults")
    _done = ok
    return ok
