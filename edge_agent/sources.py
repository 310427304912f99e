"""Inputs other than the HTTP API: a list of files (``splitinfer edge classify``) and a watched directory
(``splitinfer edge watch``). Both decode with the same limits as uploads and write one JSON line per file:
the result, or ``{"file": ..., "error": ..., "status": ...}`` for a file that cannot be classified; a bad file
never stops the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from edge_agent.runtime import EdgeRuntime
from splitinfer.errors import InvalidInput, SplitInferError
from splitinfer.imaging import decode_upload

SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


def classify_file(rt: EdgeRuntime, path: Path, max_bytes: int, max_pixels: int) -> dict[str, Any]:
    """One JSON-ready record for ``path``: the runtime's answer, or the reason it has none."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidInput(f"file is {size} bytes; the limit is {max_bytes}")
        data = path.read_bytes()
        x = decode_upload(data, rt.plan.input, max_pixels)
        res = rt.infer(x, path.name, raw=data)
    except (OSError, SplitInferError) as exc:
        return {"file": str(path), "error": str(exc), "status": type(exc).__name__}
    return {"file": str(path), **res.to_dict()}


def classify_files(rt: EdgeRuntime, paths: Iterable[Path], out: IO[str], max_bytes: int,
                   max_pixels: int) -> tuple[int, int]:
    """Classify ``paths`` in order, one JSON line each on ``out``; returns (answered, failed)."""
    ok = failed = 0
    for p in paths:
        rec = classify_file(rt, Path(p), max_bytes, max_pixels)
        failed += "error" in rec
        ok += "error" not in rec
        out.write(json.dumps(rec) + "\n")
        out.flush()
    return ok, failed


def new_files(directory: Path, seen: set[Path], settle_s: float = 0.5,
              clock: Callable[[], float] = time.time) -> list[Path]:
    """Files in ``directory`` with a known suffix, not seen before and unmodified for ``settle_s`` (so a file
    still being written is not read half-way), oldest first."""
    found = []
    now = clock()
    for p in directory.iterdir():
        if p in seen or not p.is_file() or p.suffix.lower() not in SUFFIXES:
            continue
        try:
            mtime = p.stat().st_mtime
        except OSError:
            continue
        if now - mtime >= settle_s:
            found.append((mtime, p))
    return [p for _, p in sorted(found)]


def watch(rt: EdgeRuntime, directory: Path, out: IO[str], max_bytes: int, max_pixels: int,
          interval_s: float = 0.5, settle_s: float = 0.5, stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
    """Poll ``directory`` and classify each new file once; yields the number classified after every poll."""
    seen: set[Path] = set()
    total = 0
    while not stop():
        batch = new_files(directory, seen, settle_s)
        seen.update(batch)
        ok, failed = classify_files(rt, batch, out, max_bytes, max_pixels)
        total += ok + failed
        yield total
        time.sleep(interval_s)
