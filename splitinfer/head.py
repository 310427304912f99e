"""The edge head as one engine: a stage-backend protocol, the one walk over a head's boundaries, and the one
exit policy. numpy only (no torch): the torch agent, the torch-free agent, calibration, exit training, the
profiler and the benches all run a head through :func:`walk` and decide exits with :class:`ExitPolicy`.

Backends (anything with ``num_stages``, ``run``, ``exit_logits`` and ``all_finite``):

* :class:`splitinfer.torch_head.TorchStages` -- the staged model (or an int8 head) and the exit heads in torch;
* :class:`edge_agent.onnx_head.OnnxHead` -- the exported head in ONNX Runtime (numpy in and out).

A backend's tensors stay in its own type (torch tensors, numpy arrays); only exit logits cross as numpy, so the
exit decision is the same code, on the same dtype, whatever runs the head.

One request's head::

    outcome = run_head(backend, policy, x, split, exits)
    if outcome.exit is not None: ...          # an exit was confident: answer outcome.exit.label
    else: ...                                 # encode outcome.tensor (boundary ``split``) and offload
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import numpy as np

from splitinfer.errors import InvalidInput

SCORES = ("max_softmax", "margin", "neg_entropy")
"""Exit confidence scores (higher = more confident)."""


@runtime_checkable
class StageBackend(Protocol):
    """Runs a staged model's stages and exit heads; tensors are the backend's own type."""

    num_stages: int

    def run(self, h: Any, start: int, end: int) -> Any:
        """Boundary ``start`` tensor in, boundary ``end`` tensor out (``h`` itself when ``start == end``)."""
        ...

    def exit_logits(self, boundary: int, h: Any) -> np.ndarray:
        """Logits ``[B, classes]`` (float32 numpy) of the exit head at ``boundary`` for boundary tensor ``h``."""
        ...

    def all_finite(self, h: Any) -> bool:
        """True when ``h`` holds no NaN or infinite value."""
        ...


# ---------------------------------------------------------------------------------------------- scores


@dataclass(slots=True)
class Scores:
    """Per row of a logits batch: the exit score, the top-1 probability and the top-1 class."""

    score: np.ndarray
    confidence: np.ndarray
    label: np.ndarray


def score_logits(logits: np.ndarray, score: str = "max_softmax") -> Scores:
    """One softmax over ``logits`` ``[B, classes]`` gives the score named ``score`` (one of :data:`SCORES`), the
    max probability and the argmax. The one scoring function: calibration, the agents and the profiler use it."""
    z = np.asarray(logits, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] < 1:
        raise InvalidInput(f"logits must be [batch, classes], got shape {list(z.shape)}")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    label = p.argmax(axis=1)
    top = p.max(axis=1)  # == p[row, label]: the same element, without fancy indexing (this runs per request)
    if score == "max_softmax":
        s = top
    elif score == "margin":
        if p.shape[1] < 2:
            s = top
        else:
            two = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
            s = two.max(axis=1) - two.min(axis=1)
    elif score == "neg_entropy":
        s = (p * np.log(np.maximum(p, np.float32(1e-12)))).sum(axis=1)
    else:
        raise ValueError(f"unknown confidence score {score!r}; choose one of {', '.join(SCORES)}")
    return Scores(s, top, label)


def top1(logits: np.ndarray) -> tuple[float, int]:
    """(max softmax, argmax) of the first row of ``logits``."""
    s = score_logits(logits)
    return float(s.confidence[0]), int(s.label[0])


# ---------------------------------------------------------------------------------------------- policy


@dataclass(slots=True)
class ExitCheck:
    """One exit evaluated on one request: its score, top-1 answer, and whether it answers (score >= threshold)."""

    boundary: int
    score: float
    confidence: float
    label: int
    fires: bool


@dataclass(frozen=True)
class ExitPolicy:
    """The exit decision: an exit answers when its score reaches its threshold; the first confident one wins.
    Pure (no state); ``thresholds`` and ``scores`` come from the plan (:meth:`from_plan`)."""

    thresholds: Mapping[int, float]
    scores: Mapping[int, str] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: Any) -> ExitPolicy:
        """Thresholds and scores of every exit of a :class:`splitinfer.plan.Plan`."""
        return cls(plan.thresholds(), plan.scores())

    def check(self, boundary: int, logits: np.ndarray) -> ExitCheck:
        """Score the exit at ``boundary`` on the first row of ``logits`` and decide."""
        s = score_logits(logits, self.scores.get(boundary, "max_softmax"))
        value = float(s.score[0])
        return ExitCheck(boundary, value, float(s.confidence[0]), int(s.label[0]),
                         value >= self.thresholds[boundary])


# ---------------------------------------------------------------------------------------------- the walk


@dataclass(slots=True)
class Step:
    """One boundary the head stopped at: its tensor and, when an exit is evaluated there, the exit's logits."""

    boundary: int
    tensor: Any
    logits: np.ndarray | None = None
    head_s: float = 0.0
    """Time spent in the stages that produced ``tensor`` (seconds)."""
    exit_s: float = 0.0
    """Time spent in the exit head (seconds, 0 without one)."""


def stops(end: int, points: Iterable[int] = ()) -> list[int]:
    """The boundaries a walk to ``end`` stops at: ``points`` inside ``1..end-1``, then ``end``."""
    return sorted({b for b in points if 0 < b < end} | {end})


@lru_cache(maxsize=1024)
def _cached_stops(end: int, points: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(stops(end, points))


def walk(backend: StageBackend, x: Any, end: int, exits: Collection[int] = (), points: Iterable[int] = (),
         clock: Callable[[], float] = time.perf_counter) -> Iterator[Step]:
    """Run ``backend`` from the input ``x`` to boundary ``end``, yielding a :class:`Step` at every exit
    boundary in ``exits`` (with the exit's logits), at every other boundary in ``points``, and at ``end``.

    Lazy: stop iterating (an exit answered) and the later stages never run. A consumer that keeps a yielded
    tensor past the next step must copy it (a torch stage may work in place on its input)."""
    if not 0 <= end <= backend.num_stages:
        raise InvalidInput(f"boundary {end} outside 0..{backend.num_stages}")
    h, prev = x, 0
    for b in _cached_stops(end, (*exits, *points)):  # per request: the same few operating points
        t0 = clock()
        h = backend.run(h, prev, b)
        t1 = clock()
        prev = b
        logits = None
        t2 = t1
        if b in exits:
            logits = backend.exit_logits(b, h)
            t2 = clock()
        yield Step(b, h, logits, t1 - t0, t2 - t1)


@dataclass(slots=True)
class HeadOutcome:
    """What the head decided for one request."""

    exit: ExitCheck | None
    """The exit that answered, or None: offload (or answer with the full model when ``boundary == N``)."""
    deepest: ExitCheck | None
    """The deepest exit evaluated (the degraded answer when the server cannot answer)."""
    first_score: float | None
    """The first evaluated exit's score (the drift monitor watches it)."""
    boundary: int
    """Where the head stopped: the exit's boundary, or the split."""
    tensor: Any
    """The boundary tensor there."""
    head_s: float = 0.0
    exit_s: float = 0.0
    checks: list[ExitCheck] = field(default_factory=list)


def run_head(backend: StageBackend, policy: ExitPolicy, x: Any, split: int, exits: Collection[int] = (),
             clock: Callable[[], float] = time.perf_counter) -> HeadOutcome:
    """One request through the head: :func:`walk` to ``split`` evaluating ``exits`` with ``policy``; stops at
    the first exit that fires. Raises InvalidInput when the input drives the model to non-finite values."""
    out = HeadOutcome(None, None, None, 0, x)
    for step in walk(backend, x, split, exits, clock=clock):
        t0 = clock()
        finite = backend.all_finite(step.tensor)
        t1 = clock()
        out.head_s += step.head_s + (t1 - t0)  # the check is part of running the head
        out.boundary, out.tensor = step.boundary, step.tensor
        if not finite:
            raise InvalidInput(f"the input drives the model to non-finite values at boundary {step.boundary}; "
                               "is it normalised like the plan's input spec?")
        if step.logits is None:
            continue
        check = policy.check(step.boundary, step.logits)
        out.exit_s += step.exit_s + (clock() - t1)  # the exit head and its decision
        out.checks.append(check)
        out.deepest = check
        if out.first_score is None:
            out.first_score = check.score
        if check.fires:
            out.exit = check
            break
    return out
