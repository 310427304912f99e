"""Decoding several requests' payloads together: what the tail runtime produces and the batcher consumes.

A payload decodes either to a tensor ``[B, *boundary]`` or only half way, to a :class:`Staged` input (e.g. the
learned bottleneck's entropy-decoded symbols): the halves of one ``group`` are finished in one call (the
bottleneck's decoder network runs once for all of them), then each job's part is checked on its own, so only
a bad payload's job fails. :class:`~cloud_server.tail.TailRuntime` makes the halves;
:class:`~cloud_server.batcher.Batcher` and :meth:`TailRuntime.decode_many` finish them here. Neither imports
the other.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Staged:
    """A job's input decoded half way; jobs of the same ``group`` are finished together in one call."""

    group: Hashable
    rows: np.ndarray  # [B, ...]: this job's samples
    finish: Callable[[np.ndarray], torch.Tensor]  # rows of one or more jobs -> their tensor [sum B, ...]
    check: Callable[[torch.Tensor], torch.Tensor]  # validates one job's part (raises for a bad payload)


def finish_prepared(prepared: list[object]) -> tuple[dict[int, torch.Tensor], list[object]]:
    """Items are tensors, :class:`Staged` halves, or the exception a job's ``prepare`` raised. The staged ones
    are finished per group (:func:`finish_staged`). Returns the ready tensors by index, and per index the
    exception that fails it (None when it is ready)."""
    outcomes: list[object] = [x if isinstance(x, BaseException) else None for x in prepared]
    ready = {i: x for i, x in enumerate(prepared) if isinstance(x, torch.Tensor)}
    groups: dict[Hashable, list[tuple[int, Staged]]] = {}
    for i, x in enumerate(prepared):
        if isinstance(x, Staged):
            groups.setdefault(x.group, []).append((i, x))
    for members in groups.values():
        finish_staged(members, ready, outcomes)
    return ready, outcomes


def finish_staged(members: list[tuple[int, Staged]], ready: dict[int, torch.Tensor], outcomes: list[object]) -> None:
    """Finish the staged inputs of one group in one call, then check each job's part. If the joint call fails,
    each job is finished alone, so only a bad payload's job fails."""
    joint = None
    if len(members) > 1:
        try:
            joint = members[0][1].finish(np.concatenate([m.rows for _, m in members]))
        except Exception:  # noqa: BLE001 - retried per job below, where the culprit gets the error
            joint = None
    offset = 0
    for i, m in members:
        n = int(m.rows.shape[0])
        try:
            part = joint[offset:offset + n] if joint is not None else m.finish(m.rows)
            ready[i] = m.check(part)
        except Exception as exc:  # noqa: BLE001 - that job's error
            outcomes[i] = exc
        offset += n
