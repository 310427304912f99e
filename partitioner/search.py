"""Search over configurations: every (split, codec, exit subset) scored by the cost model, filtered by
constraints, ranked by an objective; the Pareto set; and the operating-point table over a link grid.

* **Configurations.** A split ``k`` in the candidate splits; a codec (``uint8-affine`` at every boundary, a
  learned codec only at its own boundary); a subset of the exits at boundaries ``<= k`` (an exit left out
  never fires, so its samples go on: certified thresholds stay valid for every subset).
* **Metrics.** Expected latency, edge energy and bytes sent per request from :mod:`partitioner.cost`; the
  estimated accuracy drop (points, on validation data: the exits' drop plus, for offloaded samples, the
  codec's); the edge's memory (head weights + peak activations).
* **Constraints.** ``max_accuracy_drop`` (points), ``max_edge_memory`` (bytes), ``max_bytes`` (bytes on the
  uplink per offloaded request, payload only), ``max_leakage`` (SSIM of a white-box inversion of the payload an
  offloaded request sends, from a leakage table: :mod:`partitioner.privacy`; a configuration whose leakage is
  unknown is not admitted).
* **Objectives.** ``latency``, ``energy``, ``bytes``, ``privacy`` (expected leakage per request: the payload's
  SSIM x the offload rate), or ``weighted``: a weighted sum of them, each divided by its mean over the feasible
  configurations (so the weights are unit-free).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from partitioner.cost import Link, estimate_split
from partitioner.profile import Profile
from splitinfer.bundle import OperatingPoint, SplitEstimate
from splitinfer.energy import DeviceProfile

METRICS = ("latency", "energy", "bytes", "privacy")


@dataclass(frozen=True)
class Objective:
    """What to minimise: one metric, or a weighted sum of normalised metrics."""

    kind: str = "latency"
    weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (*METRICS, "weighted"):
            raise ValueError(f"objective must be latency, energy, bytes, privacy or weighted, not {self.kind!r}")
        if self.kind == "weighted" and not any(w > 0 for _, w in self.weights):
            raise ValueError("a weighted objective needs at least one positive weight, e.g. latency=1,energy=0.5")
        for name, w in self.weights:
            if name not in METRICS or w < 0:
                raise ValueError(f"weights are non-negative numbers for {', '.join(METRICS)}; got {name}={w}")

    @classmethod
    def parse(cls, kind: str, weights: str | None = None) -> Objective:
        """``Objective.parse("weighted", "latency=1,energy=0.5")``."""
        pairs: list[tuple[str, float]] = []
        for part in (weights or "").split(","):
            if not part.strip():
                continue
            m = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*", part)
            if not m:
                raise ValueError(f"weight {part!r} must look like latency=1")
            pairs.append((m.group(1), float(m.group(2))))
        return cls(kind=kind, weights=tuple(pairs))

    @property
    def uses_privacy(self) -> bool:
        """True when the objective weighs leakage (it then needs a leakage table)."""
        return self.kind == "privacy" or any(n == "privacy" and w > 0 for n, w in self.weights)

    def describe(self) -> str:
        if self.kind != "weighted":
            return self.kind
        return "weighted(" + ",".join(f"{n}={w:g}" for n, w in self.weights) + ")"


@dataclass(frozen=True)
class Constraints:
    """Hard limits; ``None`` means no limit."""

    max_accuracy_drop: float | None = None
    max_edge_memory: int | None = None
    max_bytes: int | None = None
    max_bundle_bytes: int | None = None  # the bundle's files: what an over-the-air update costs
    # certified at epsilon: the upper confidence bound of the final answers' disagreement with the fp32 model
    # (estimates that carry one: joint planning) at most this
    epsilon: float | None = None
    max_leakage: float | None = None  # SSIM of a white-box inversion of an offloaded request's payload

    def admits(self, e: SplitEstimate) -> bool:
        if self.max_accuracy_drop is not None and (e.accuracy_drop_points or 0.0) > self.max_accuracy_drop + 1e-9:
            return False
        if self.max_edge_memory is not None and (e.edge_memory_bytes or 0) > self.max_edge_memory:
            return False
        if self.max_bytes is not None and e.offload_rate > 0 and e.bytes_per_offload > self.max_bytes:
            return False
        if self.max_bundle_bytes is not None and (e.bundle_bytes or 0) > self.max_bundle_bytes:
            return False
        if self.epsilon is not None and e.disagreement_bound is not None and e.disagreement_bound > self.epsilon:
            return False
        if self.max_leakage is not None and (e.leakage_ssim is None or e.leakage_ssim > self.max_leakage + 1e-9):
            return False
        return e.expected_latency_ms != float("inf")

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("max_accuracy_drop", self.max_accuracy_drop),
                                  ("max_edge_memory", self.max_edge_memory), ("max_bytes", self.max_bytes),
                                  ("max_bundle_bytes", self.max_bundle_bytes), ("epsilon", self.epsilon),
                                  ("max_leakage", self.max_leakage))
                if v is not None}


@dataclass
class ExitConfig:
    """The behaviour of one subset of exits on validation data."""

    exits: tuple[int, ...]
    rates: dict[int, float]
    drop_points: float = 0.0
    agreement: float = 1.0


@dataclass
class CodecOption:
    """A codec the planner may use: its costs (edge and server profiles whose codec columns are this codec's),
    where it applies (``boundaries``; None: everywhere) and its measured accuracy drop (points)."""

    name: str
    edge: Profile
    server: Profile
    boundaries: frozenset[int] | None = None
    drop_points: float = 0.0
    agreement: float = 1.0


def metric(e: SplitEstimate, name: str) -> float:
    """One metric of an estimate (energy is 0 when no device profile was given)."""
    if name == "latency":
        return e.expected_latency_ms
    if name == "energy":
        return e.expected_energy_j or 0.0
    if name == "privacy":
        return (e.leakage_ssim or 0.0) * e.offload_rate
    return e.expected_bytes if e.expected_bytes is not None else e.bytes_per_offload * e.offload_rate


@dataclass
class Planner:
    """Scores every configuration for a link and picks, filters and tabulates them."""

    codecs: Sequence[CodecOption]
    splits: Sequence[int]
    exit_config: Callable[[tuple[int, ...]], ExitConfig] | None = None
    exit_boundaries: Sequence[int] = ()
    device: DeviceProfile | None = None
    edge_slowdown: float = 1.0
    server_load_rps: float = 0.0
    # joint planning: the head variant's name, its bundle's bytes, and a hook that fills an estimate's
    # end-to-end figures (partitioner.joint.SystemJudge)
    head: str = "fp32"
    bundle_bytes: int | None = None
    system: Callable[[SplitEstimate], None] | None = None
    exit_share: float | None = None  # joint planning: the share of epsilon the exits were calibrated at
    # the leakage table (partitioner.privacy.LeakageTable: ``ssim(boundary, codec)``), or None: leakage unknown
    leakage: object | None = None
    _exit_cache: dict[tuple[int, ...], ExitConfig] = field(default_factory=dict, repr=False)

    def _exits(self, subset: tuple[int, ...]) -> ExitConfig:
        if subset not in self._exit_cache:
            if self.exit_config is None or not subset:
                self._exit_cache[subset] = ExitConfig(exits=subset, rates={})
            else:
                self._exit_cache[subset] = self.exit_config(subset)
        return self._exit_cache[subset]

    def exit_rates(self, subset: tuple[int, ...]) -> dict[int, float]:
        """Validation exit rates of ``subset`` used together."""
        return dict(self._exits(subset).rates)

    def _subsets(self, k: int) -> Iterable[tuple[int, ...]]:
        usable = [b for b in sorted(self.exit_boundaries) if 0 < b <= k]
        for r in range(len(usable) + 1):
            yield from itertools.combinations(usable, r)

    def evaluate(self, link: Link) -> list[SplitEstimate]:
        """Every configuration's estimate at ``link``."""
        out: list[SplitEstimate] = []
        for c in self.codecs:
            n = c.edge.num_stages
            for k in self.splits:
                if c.boundaries is not None and k not in c.boundaries:
                    continue
                if k == n and c is not self.codecs[0]:
                    continue  # edge-only sends nothing: listed once, under the first codec
                for subset in self._subsets(k):
                    ex = self._exits(subset)
                    e = estimate_split(k, c.edge, c.server, ex.rates, link, self.edge_slowdown, self.device,
                                       self.server_load_rps)
                    e.codec = c.name
                    e.exits = list(subset)
                    e.expected_bytes = round(e.bytes_per_offload * e.offload_rate, 3)
                    drop = ex.drop_points + (e.offload_rate * c.drop_points if k < n else 0.0)
                    e.accuracy_drop_points = round(drop, 4)
                    if c.edge.head_peak_bytes:
                        e.edge_memory_bytes = int(c.edge.head_peak_bytes[k])
                    e.head = self.head
                    e.bundle_bytes = self.bundle_bytes
                    e.exit_share = self.exit_share
                    if self.leakage is not None:
                        e.leakage_ssim = self.leakage.ssim(k, c.name)
                    out.append(e)
        return out

    def judge(self, e: SplitEstimate) -> None:
        """Fill ``e``'s end-to-end figures (joint planning's ``system`` hook; nothing without one)."""
        if self.system is not None and e.disagreement is None:
            self.system(e)

    def choose(self, link: Link, objective: Objective = Objective(),
               constraints: Constraints = Constraints()) -> SplitEstimate:
        """The feasible configuration with the best objective; ValueError when the constraints exclude all."""
        return choose_among(self.evaluate(link), objective, constraints,
                            self.judge if self.system is not None else None)

    def pareto(self, link: Link, constraints: Constraints = Constraints()) -> list[SplitEstimate]:
        """Feasible configurations not dominated in (latency, energy, bytes, accuracy drop), by latency."""
        return lazy_pareto(self.evaluate(link), constraints, self.judge if self.system is not None else None)

    def grid(self, bandwidths: Iterable[float], rtts: Iterable[float], objective: Objective = Objective(),
             constraints: Constraints = Constraints(), base: Link | None = None) -> list[OperatingPoint]:
        """The chosen configuration for every (bandwidth, RTT) pair (other link properties from ``base``)."""
        points = []
        for bw in bandwidths:
            for rtt in rtts:
                link = Link(bw, rtt) if base is None else Link(
                    bw, rtt, base.loss, None, base.request_overhead, base.response_overhead)
                e = self.choose(link, objective, constraints)
                ex = self._exits(tuple(e.exits))
                codec = next(c for c in self.codecs if c.name == e.codec
                             and (c.boundaries is None or e.split in c.boundaries))
                agreement = 1.0 - e.disagreement if e.disagreement is not None else \
                    ex.agreement * (codec.agreement if e.offload_rate > 0 else 1.0)
                points.append(OperatingPoint(
                    bandwidth_bps=bw, rtt_ms=rtt * 1e3, split=e.split, codec=e.codec, exits=e.exits,
                    expected_latency_ms=e.expected_latency_ms, expected_bytes=metric(e, "bytes"),
                    expected_agreement=round(agreement, 5), expected_energy_j=e.expected_energy_j,
                    **prediction_parts(e, link)))
        return points


def prediction_parts(e: SplitEstimate, link: Link) -> dict[str, float]:
    """An operating point's prediction split into what the edge agent rescales on its own (edge time, server time)
    and what it recomputes from its link estimate (RTT, bytes): see ``OperatingPoint.predicted_ms``. Empty for an
    estimate without its network part."""
    if e.network_ms is None:
        return {}
    q = e.offload_rate
    return {"edge_part_ms": round(e.expected_latency_ms - q * (e.network_ms + e.server_ms), 4),
            "server_ms": e.server_ms, "offload_rate": q,
            "request_bytes": float(e.bytes_per_offload + link.request_overhead) if q > 0 else 0.0,
            "response_bytes": float((e.response_bytes or 0) + link.response_overhead) if q > 0 else 0.0}


def choose_among(estimates: Sequence[SplitEstimate], objective: Objective = Objective(),
                 constraints: Constraints = Constraints(),
                 judge: Callable[[SplitEstimate], None] | None = None) -> SplitEstimate:
    """The feasible estimate with the best objective; ValueError naming the tightest constraint when none is.

    With ``judge`` (joint planning) the end-to-end figures are filled in best-first and only until one
    configuration passes every constraint: the others are never judged."""
    feasible = [e for e in estimates if constraints.admits(e)]
    if judge is not None:
        for e in ranked(feasible, objective):
            judge(e)
            if constraints.admits(e):
                return e
        feasible = []
    if not feasible:
        raise ValueError(f"no configuration satisfies the constraints {constraints.to_dict()}: "
                         f"{explain_infeasible(estimates, constraints)}")
    return best(feasible, objective)


def lazy_pareto(estimates: Sequence[SplitEstimate], constraints: Constraints,
                judge: Callable[[SplitEstimate], None] | None = None, limit: int = 12) -> list[SplitEstimate]:
    """The Pareto front of the feasible estimates. With ``judge`` (joint planning) only its first ``limit``
    members by latency are listed: each is judged end to end, one that fails is dropped and the front
    recomputed, until ``limit`` members pass (or the front is exhausted)."""
    feasible = [e for e in estimates if constraints.admits(e)]
    if judge is None:
        return pareto_front(feasible)
    while True:
        front = pareto_front(feasible)
        kept, failed = [], set()
        for e in front:
            judge(e)
            if constraints.admits(e):
                kept.append(e)
                if len(kept) == limit:
                    break
            else:
                failed.add(id(e))
                break
        if not failed:
            return kept
        feasible = [e for e in feasible if id(e) not in failed]


def explain_infeasible(estimates: Sequence[SplitEstimate], constraints: Constraints) -> str:
    """Which constraint is the tightest (alone, it admits the fewest configurations) and the best value any
    configuration reaches for it."""
    checks: dict[str, tuple[Callable[[SplitEstimate], float | None], float | None, str]] = {
        "max_accuracy_drop": (lambda e: e.accuracy_drop_points, constraints.max_accuracy_drop, "points"),
        "max_edge_memory": (lambda e: e.edge_memory_bytes, constraints.max_edge_memory, "bytes"),
        "max_bundle_bytes": (lambda e: e.bundle_bytes, constraints.max_bundle_bytes, "bytes"),
        "max_bytes": (lambda e: e.bytes_per_offload if e.offload_rate > 0 else 0, constraints.max_bytes, "bytes"),
        "epsilon": (lambda e: e.disagreement_bound, constraints.epsilon, "(upper bound of the disagreement with "
                                                                         "the fp32 model)"),
        "max_leakage": (lambda e: e.leakage_ssim, constraints.max_leakage,
                        "SSIM (white-box reconstruction of an offloaded input; edge-only sends nothing)"),
    }
    rows = []
    for name, (get, limit, unit) in checks.items():
        if limit is None:
            continue
        values = [v for v in (get(e) for e in estimates) if v is not None]
        if not values:
            continue
        admitted = sum(v <= limit + 1e-9 for v in values)
        rows.append((admitted, name, limit, min(values), unit))
    if not rows:
        return "no configuration has a finite latency estimate"
    admitted, name, limit, best_value, unit = min(rows)
    flag = "--" + name.replace("_", "-")
    return (f"the tightest constraint is {flag} {limit:g}: {admitted} of {len(estimates)} configurations meet it "
            f"alone; the best any configuration reaches is {best_value:g} {unit}")




def best(estimates: Sequence[SplitEstimate], objective: Objective = Objective()) -> SplitEstimate:
    """The estimate minimising ``objective`` (ties: lower latency, earlier split, fewer bytes)."""
    return ranked(estimates, objective)[0]


def ranked(estimates: Sequence[SplitEstimate], objective: Objective = Objective()) -> list[SplitEstimate]:
    """``estimates`` from best to worst under ``objective`` (ties: lower latency, earlier split, fewer bytes)."""
    if objective.kind == "weighted":
        means = {m: sum(metric(e, m) for e in estimates) / len(estimates) for m in METRICS}
        weights = dict(objective.weights)

        def score(e: SplitEstimate) -> float:
            return sum(w * metric(e, m) / means[m] for m, w in weights.items() if w > 0 and means[m] > 0)
    else:
        def score(e: SplitEstimate) -> float:
            return metric(e, objective.kind)
    return sorted(estimates, key=lambda e: (score(e), e.expected_latency_ms, e.split, e.bytes_per_offload))


def pareto_front(estimates: Sequence[SplitEstimate]) -> list[SplitEstimate]:
    """Estimates not dominated in (latency, energy, bytes, accuracy drop, and leakage when any estimate has
    one); duplicates kept once."""
    leak = any(e.leakage_ssim is not None for e in estimates)
    keys = [(e.expected_latency_ms, metric(e, "energy"), metric(e, "bytes"), e.accuracy_drop_points or 0.0)
            + ((e.leakage_ssim if e.leakage_ssim is not None else 1.0,) if leak else ()) for e in estimates]
    front: list[SplitEstimate] = []
    seen: set[tuple] = set()
    for i, a in enumerate(keys):
        dominated = any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for b in keys)
        if not dominated and a not in seen:
            seen.add(a)
            front.append(estimates[i])
    return sorted(front, key=lambda e: (e.expected_latency_ms, e.split))
