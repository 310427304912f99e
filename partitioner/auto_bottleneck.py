"""``plan make --bottlenecks auto``: choose the boundaries where a learned bottleneck would pay most, then train
bottlenecks there within a time budget.

Ranking (before any training): at every interior boundary with a ``[C, H, W]`` feature map (or ``[L, D]`` tokens)
among the candidate splits, a *hypothetical* bottleneck sized by :meth:`BottleneckConfig.for_boundary` is put into
the planner with an estimated payload (its latent symbols at ``bits`` bits, times :data:`CODED_FRACTION` for
entropy coding, plus the payload header) and estimated encode/decode times (its MACs at the head's measured
milliseconds per MAC on each machine). For every cell of the operating grid (bandwidth x RTT) the planner's best
expected latency with that codec at that boundary is compared with the best without any learned codec; a boundary's
score is the mean relative latency saved over the grid. The best ``count`` boundaries are taken, at most one per
feature shape (neighbouring boundaries with the same tensor shape would give near-identical codecs), and trained in
that order until the budget is spent. Every choice and its reason is reported.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from partitioner.cost import Link
from partitioner.profile import Profile
from partitioner.search import CodecOption, Planner

CODED_FRACTION = 0.6  # entropy-coded bits per raw symbol bit, a typical figure for trained 2-bit latents here
HEADER_BYTES = 9  # splitinfer.entropy's payload header
ASSUMED_DROP_POINTS = 0.5  # the ranking assumes a codec within half a point; the real one is measured later


@dataclass
class BoundaryScore:
    """One boundary's predicted value for a learned codec."""

    boundary: int
    shape: list[int]
    payload_bytes: int
    fp32_bytes: int
    mean_saving: float  # mean over the grid of (best latency without - with) / without
    cells_won: int  # grid cells where the codec at this boundary becomes the best configuration

    def reason(self, cells: int) -> str:
        """Why this boundary was chosen, in one line."""
        return (f"boundary {self.boundary} {self.shape}: a ~{self.payload_bytes} B codec (float32: "
                f"{self.fp32_bytes} B) would be the best configuration in {self.cells_won} of {cells} grid cells "
                f"and save {100 * self.mean_saving:.1f} % of the expected latency on average")


def _with_hypothetical(prof: Profile, k: int, payload: int, ms: float) -> Profile:
    p = dataclasses.replace(prof, encode_ms=list(prof.encode_ms), decode_ms=list(prof.decode_ms),
                            payload_bytes=list(prof.payload_bytes))
    p.payload_bytes[k] = payload
    p.encode_ms[k] = p.decode_ms[k] = ms
    return p


def _ms_per_mac(prof: Profile, k: int) -> float:
    macs = sum(prof.stage_macs[:k]) if prof.stage_macs else 0
    return sum(prof.stage_ms[:k]) / macs if macs else 0.0


def rank_boundaries(planner: Planner, staged, links: Sequence[Link], bits: int = 2) -> list[BoundaryScore]:
    """Score every eligible boundary of ``staged`` (see the module docstring), best first."""
    from splitinfer.bottleneck import Bottleneck
    from splitinfer.plan import BottleneckConfig

    base = {id(link): min(e.expected_latency_ms for e in planner.evaluate(link)) for link in links}
    first = planner.codecs[0]
    n = first.edge.num_stages
    scores = []
    for k in planner.splits:
        shape = list(staged.boundaries[k].shape)
        if not 0 < k < n or len(shape) not in (2, 3):
            continue
        cfg = BottleneckConfig.for_boundary(k, shape, bits=bits)
        symbols = math.prod(cfg.latent_shape)
        payload = HEADER_BYTES + math.ceil(symbols * bits * CODED_FRACTION / 8)
        enc, dec = Bottleneck(cfg).macs()
        option = CodecOption("bottleneck", _with_hypothetical(first.edge, k, payload, enc * _ms_per_mac(first.edge, k)),
                             _with_hypothetical(first.server, k, payload, dec * _ms_per_mac(first.server, k)),
                             frozenset({k}), ASSUMED_DROP_POINTS)
        only_k = dataclasses.replace(planner, codecs=[option], splits=[k])
        savings, won = [], 0
        for link in links:
            with_k = min(e.expected_latency_ms for e in only_k.evaluate(link))
            best = base[id(link)]
            saving = max(0.0, best - with_k) / best if best > 0 else 0.0
            savings.append(saving)
            won += saving > 0
        scores.append(BoundaryScore(k, shape, payload, int(staged.boundaries[k].fp32_bytes),
                                    sum(savings) / len(savings), won))
    return sorted(scores, key=lambda s: (-s.mean_saving, s.boundary))


def choose_boundaries(scores: Sequence[BoundaryScore], count: int) -> list[BoundaryScore]:
    """The best ``count`` boundaries that save anything, at most one per feature shape."""
    chosen: list[BoundaryScore] = []
    for s in scores:
        if s.mean_saving <= 0 or any(c.shape == s.shape for c in chosen):
            continue
        chosen.append(s)
        if len(chosen) == count:
            break
    return chosen


@dataclass
class AutoBottlenecks:
    """How ``plan make`` trains bottlenecks itself: the time budget, how many boundaries at most, bits, the
    training images, and where to report what it does."""

    budget_s: float = 600.0
    count: int = 3
    bits: int = 2
    train_images: int = 20000
    teacher_weights: str = "committed"  # random: the reports speak of agreement with a random teacher
    echo: Callable[[str], None] = print
    report: list[dict] = field(default_factory=list)

    def train(self, planner: Planner, staged, links: Sequence[Link], x_train, x_val, y_val, progress: bool = False):
        """Rank the boundaries, train the chosen ones within the budget; returns the trained bottlenecks."""
        from splitinfer.bottleneck import train_bottlenecks

        t0 = time.perf_counter()
        scores = rank_boundaries(planner, staged, links, self.bits)
        chosen = choose_boundaries(scores, self.count)
        if not chosen:
            self.echo("bottlenecks auto: no boundary where a learned codec is predicted to pay on this grid; "
                      "none trained")
            return []
        for s in chosen:
            self.echo(f"bottlenecks auto: chose {s.reason(len(links))}")
        left = self.budget_s - (time.perf_counter() - t0)
        trained = train_bottlenecks(staged, [s.boundary for s in chosen], x_train[: self.train_images], x_val, y_val,
                                    bits=self.bits, budget_s=left, progress=progress, echo=self.echo,
                                    teacher_weights=self.teacher_weights)
        done = {bn.cfg.boundary for bn, _ in trained}
        for s in chosen:
            status = "trained" if s.boundary in done else "skipped: the time budget was spent"
            self.report.append({"boundary": s.boundary, "status": status, "reason": s.reason(len(links))})
            if s.boundary not in done:
                self.echo(f"bottlenecks auto: boundary {s.boundary} {status} ({self.budget_s:.0f} s)")
        self.echo(f"bottlenecks auto: trained {sorted(done)} in {time.perf_counter() - t0:.0f} s "
                  f"(budget {self.budget_s:.0f} s)")
        return [bn for bn, _ in trained]
