"""Exit thresholds with a distribution-free, finite-sample guarantee (Learn-then-Test, fixed-sequence).

Goal: exit as early as possible while, with probability at least ``1 - delta`` over the calibration sample,
the rate at which the system's answers (an exit's, or the full model's when no exit fires) disagree with
the full model's on new data from the same distribution is at most ``epsilon``.

Method (see docs/early-exit-calibration.md):

1. The calibration sample is split at random into a *path* part and a *test* part.
2. On the path part, a greedy search builds a sequence of threshold vectors ``lambda_1, lambda_2, ...``
   from the most conservative (no exit fires) towards more aggressive ones: each step lowers the threshold
   of the one exit that saves the most edge MACs per added disagreement.
3. On the test part, for each ``lambda_j`` in order, the null hypothesis "risk(lambda_j) > epsilon" is
   tested with the exact binomial tail p-value ``P[Binomial(n, epsilon) <= k_j]`` (``k_j`` disagreements
   among ``n`` samples). Fixed-sequence testing rejects while ``p_j <= delta`` and stops at the first
   failure; every rejected configuration is certified with family-wise error ``<= delta``, because the
   sequence was fixed before looking at the test part. Among the certified configurations, the most
   aggressive one whose disagreement on all calibration samples also stays within the test's acceptance
   rate is returned (any certified one keeps the guarantee; this avoids ending on a lucky plateau).

Assumption: calibration and live samples are exchangeable (i.i.d. from one distribution). Under drift the
guarantee does not hold; the edge agent's drift monitor watches for it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from splitinfer.errors import SplitInferError
from splitinfer.head import score_logits, walk

NEVER = math.inf  # a threshold no score reaches: the exit never fires


class CalibrationTooSmall(SplitInferError):
    """The calibration set cannot certify the requested (epsilon, delta)."""


def min_calibration_samples(epsilon: float, delta: float) -> int:
    """Smallest test-part size at which zero disagreements certify ``epsilon`` at level ``delta``:
    ``(1 - epsilon)^n <= delta``."""
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError("epsilon and delta must lie in (0, 1)")
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


@functools.lru_cache(maxsize=64)
def _log_factorials(n: int) -> np.ndarray:
    """``log(i!)`` for ``i = 0..n`` (float64; exact sums of logs, as ``lgamma(i + 1)``)."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def binom_cdf(k: int, n: int, p: float) -> float:
    """Exact ``P[Binomial(n, p) <= k]`` (log-space sum over the terms ``0..k``, vectorised; fine for n up to
    millions)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lf = _log_factorials(n)
    i = np.arange(k + 1)
    logs = lf[n] - lf[i] - lf[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    m = float(logs.max())
    return min(1.0, math.exp(m) * float(np.exp(logs - m).sum()))


def binom_upper_bound(k: int, n: int, delta: float) -> float:
    """Clopper-Pearson one-sided upper confidence bound on a rate from ``k`` events in ``n`` trials."""
    if n == 0:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class ExitScores:
    """Per-sample exit confidences and predictions, the full model's predictions, and costs.

    ``conf[i]``/``pred[i]`` belong to exit ``boundaries[i]`` (in boundary order). ``macs_to[i]`` is the
    backbone MACs up to that exit, ``exit_macs[i]`` the exit head's own; ``full_macs`` the whole backbone.
    """

    boundaries: list[int]
    conf: np.ndarray  # [K, N]
    pred: np.ndarray  # [K, N]
    full_pred: np.ndarray  # [N]
    macs_to: list[int]
    exit_macs: list[int]
    full_macs: int
    # The answers disagreement is counted against; None: ``full_pred``. With a deployed system whose answer
    # when no exit fires (``full_pred``: compressed head, codec, tail) differs from the full fp32 model's
    # (``reference``), the certificate covers the final answer's disagreement with the fp32 model end to end.
    reference: np.ndarray | None = None

    def subset(self, idx: np.ndarray) -> ExitScores:
        return ExitScores(self.boundaries, self.conf[:, idx], self.pred[:, idx], self.full_pred[idx],
                          self.macs_to, self.exit_macs, self.full_macs,
                          None if self.reference is None else self.reference[idx])

    def joined(self, more: ExitScores) -> ExitScores:
        """These samples followed by ``more``'s (same exits and costs); references are dropped (``full_pred``
        again), as both parts may not carry one."""
        if more.boundaries != self.boundaries or more.macs_to != self.macs_to or more.exit_macs != self.exit_macs \
                or more.full_macs != self.full_macs:
            raise ValueError("joined ExitScores must have the same exits and costs")
        return ExitScores(self.boundaries, np.concatenate([self.conf, more.conf], 1),
                          np.concatenate([self.pred, more.pred], 1), np.concatenate([self.full_pred, more.full_pred]),
                          self.macs_to, self.exit_macs, self.full_macs)

    def only_exits(self, boundaries: list[int] | tuple[int, ...]) -> ExitScores:
        """The same samples with only the exits at ``boundaries`` (the others never fire)."""
        idx = [self.boundaries.index(b) for b in boundaries]
        return ExitScores([self.boundaries[i] for i in idx], self.conf[idx], self.pred[idx], self.full_pred,
                          [self.macs_to[i] for i in idx], [self.exit_macs[i] for i in idx], self.full_macs,
                          self.reference)

    def with_fallback(self, fallback: np.ndarray, reference: np.ndarray) -> ExitScores:
        """The deployed system's scores: ``fallback`` answers when no exit fires, disagreement counted against
        ``reference`` (the full fp32 model's answers)."""
        if len(fallback) != self.n or len(reference) != self.n:
            raise ValueError(f"fallback/reference hold {len(fallback)}/{len(reference)} answers for {self.n} samples")
        return ExitScores(self.boundaries, self.conf, self.pred, np.asarray(fallback), self.macs_to, self.exit_macs,
                          self.full_macs, np.asarray(reference))

    @property
    def ref(self) -> np.ndarray:
        """The answers disagreement is counted against."""
        return self.full_pred if self.reference is None else self.reference

    @property
    def n(self) -> int:
        return len(self.full_pred)


@dataclass
class Outcome:
    """What a threshold vector does on a sample set."""

    thresholds: list[float]
    exit_rates: list[float]
    disagreements: int
    n: int
    mean_macs: float

    @property
    def disagreement(self) -> float:
        return self.disagreements / max(1, self.n)


def apply(scores: ExitScores, thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Index of the exit that answers each sample (K = the full model) and the system's answers."""
    k_exits, n = scores.conf.shape
    where = np.full(n, k_exits)
    for i in range(k_exits - 1, -1, -1):  # earliest confident exit wins
        where[scores.conf[i] >= thresholds[i]] = i
    answer = scores.full_pred.copy()
    for i in range(k_exits):
        m = where == i
        answer[m] = scores.pred[i][m]
    return where, answer


def evaluate(scores: ExitScores, thresholds: list[float]) -> Outcome:
    """Exit rates, disagreements with the full model, and mean MACs per sample (backbone + exits run)."""
    where, answer = apply(scores, thresholds)
    k_exits = len(thresholds)
    cum_exit = np.cumsum([0] + list(scores.exit_macs))
    cost_at = [scores.macs_to[i] + cum_exit[i + 1] for i in range(k_exits)]
    cost_full = scores.full_macs + cum_exit[k_exits]
    counts = np.bincount(where, minlength=k_exits + 1)
    mean_macs = (sum(counts[i] * cost_at[i] for i in range(k_exits)) + counts[k_exits] * cost_full) / max(1, scores.n)
    return Outcome(thresholds=list(thresholds), exit_rates=[float(c) / max(1, scores.n) for c in counts[:k_exits]],
                   disagreements=int((answer != scores.ref).sum()), n=scores.n, mean_macs=float(mean_macs))


def threshold_path(scores: ExitScores, steps: int = 400, max_disagreement: float = 0.1) -> list[list[float]]:
    """Greedy sequence of threshold vectors from 'no exit fires' towards aggressive (see module docstring).

    A candidate move lowers one exit's threshold just enough that about ``n / steps`` more of the samples
    that currently reach that exit fire there; the move that saves the most MACs per added disagreement
    (smoothed by +0.5) is taken. The walk ends when every exit fires on every sample reaching it or the
    disagreement on the path part exceeds ``max_disagreement``.
    """
    k_exits, n = scores.conf.shape
    step = max(1, n // steps)
    thresholds = [NEVER] * k_exits
    current = evaluate(scores, thresholds)
    path = [list(thresholds)]
    while True:
        where, _ = apply(scores, thresholds)
        best, best_gain, best_out = None, -math.inf, None
        for i in range(k_exits):
            waiting = scores.conf[i][(where > i) & (scores.conf[i] < thresholds[i])]
            if waiting.size == 0:
                continue
            ordered = np.sort(waiting)[::-1]
            trial = list(thresholds)
            trial[i] = float(ordered[min(step, ordered.size) - 1])
            out = evaluate(scores, trial)
            gain = (current.mean_macs - out.mean_macs) / (max(out.disagreements - current.disagreements, 0) + 0.5)
            if gain > best_gain:
                best, best_gain, best_out = trial, gain, out
        if best is None:
            break
        thresholds, current = best, best_out
        path.append(list(thresholds))
        if current.disagreement > max_disagreement:
            break
    return path


def certify_along(path: list[list[float]], test_part: ExitScores, pooled: ExitScores, epsilon: float,
                  delta: float) -> tuple[int, int, float]:
    """Fixed-sequence testing along ``path`` on ``test_part``; returns (chosen index, length of the certified
    prefix, chosen p-value).

    ``path[0]`` (no exit fires) always passes when ``test_part`` is large enough. Every configuration in the
    certified prefix carries the guarantee, so any of them may be chosen. The last one tends to end a plateau
    of equal test-part counts, where the true risk has crept up unseen; so the most aggressive certified
    configuration whose disagreement on all calibration samples (``pooled``) also stays within the test's
    acceptance rate (largest count with p-value <= delta, over the test-part size) is chosen.
    """
    n_test = test_part.n
    prefix: list[float] = []
    for lam in path:
        p = binom_cdf(evaluate(test_part, lam).disagreements, n_test, epsilon)
        if p > delta:
            break
        prefix.append(p)
    if not prefix:
        raise CalibrationTooSmall("even 'no exit' cannot be certified: the test part is too small")
    k_accept = 0  # the largest count whose p-value is <= delta (the tail grows with k: stop at the first above)
    while k_accept < n_test and binom_cdf(k_accept + 1, n_test, epsilon) <= delta:
        k_accept += 1
    chosen = next((j for j in range(len(prefix) - 1, 0, -1)
                   if evaluate(pooled, path[j]).disagreements * n_test <= k_accept * pooled.n), 0)
    return chosen, len(prefix), prefix[chosen]


@dataclass
class Calibration:
    """The chosen thresholds and the evidence behind them."""

    mode: str  # "certified" or "empirical"
    score: str
    epsilon: float
    delta: float
    boundaries: list[int]
    thresholds: list[float]
    n_path: int
    n_test: int
    disagreements: int
    p_value: float | None
    upper_bound: float | None
    exit_rates: list[float]
    mean_macs: float
    full_macs: int
    path_steps: int
    certified_steps: int
    notes: list[str] = field(default_factory=list)

    @property
    def empirical_disagreement(self) -> float:
        return self.disagreements / max(1, self.n_test)


def calibrate(scores: ExitScores, epsilon: float, delta: float, score: str = "max_softmax",
              path_fraction: float = 0.5, seed: int = 0, mode: str = "certified") -> Calibration:
    """Choose exit thresholds; ``mode="certified"`` gives the guarantee, ``"empirical"`` does not."""
    n = scores.n
    if mode == "empirical":
        path = threshold_path(scores)
        chosen, steps = evaluate(scores, path[0]), 0
        for j, lam in enumerate(path):
            out = evaluate(scores, lam)
            if out.disagreement <= epsilon:
                chosen, steps = out, j
        return Calibration("empirical", score, epsilon, delta, scores.boundaries, chosen.thresholds, n, n,
                           chosen.disagreements, None, None, chosen.exit_rates, chosen.mean_macs, scores.full_macs,
                           len(path), steps, ["empirical: no finite-sample guarantee"])
    if mode != "certified":
        raise ValueError("mode must be 'certified' or 'empirical'")
    return calibrate_each(scores, [epsilon], delta, score, path_fraction, seed)[0]


def calibrate_each(scores: ExitScores, epsilons: list[float], delta: float, score: str = "max_softmax",
                   path_fraction: float = 0.5, seed: int = 0) -> list[Calibration | None]:
    """Certified calibrations at several ``epsilons`` from one greedy path (the path depends only on the path
    part, so each is exactly what :func:`calibrate` returns at that epsilon); None where even 'no exit' cannot
    be certified. Raises CalibrationTooSmall when the test part is too small for the smallest epsilon."""
    n = scores.n
    need = min_calibration_samples(min(epsilons), delta)
    need_total = math.ceil(need / (1 - path_fraction))
    n_path = int(round(n * path_fraction))
    n_test = n - n_path
    if n_test < need:
        raise CalibrationTooSmall(
            f"calibration set too small: {n} samples; certifying epsilon={min(epsilons)} at delta={delta} needs at "
            f"least {need} samples in the test part even with zero disagreements, i.e. at least {need_total} in all "
            f"(with path fraction {path_fraction})")
    perm = np.random.default_rng(seed).permutation(n)
    path_part, test_part = scores.subset(perm[:n_path]), scores.subset(perm[n_path:])
    path = threshold_path(path_part)
    out: list[Calibration | None] = []
    for epsilon in epsilons:
        try:
            certified, prefix, chosen_p = certify_along(path, test_part, scores, epsilon, delta)
        except CalibrationTooSmall:
            if len(epsilons) == 1:
                raise
            out.append(None)
            continue
        chosen = evaluate(test_part, path[certified])
        notes = []
        if prefix == 1:
            notes.append("no exit configuration could be certified; all exits disabled")
        out.append(Calibration("certified", score, epsilon, delta, scores.boundaries, chosen.thresholds, n_path,
                               n_test, chosen.disagreements, chosen_p,
                               binom_upper_bound(chosen.disagreements, n_test, delta), chosen.exit_rates,
                               chosen.mean_macs, scores.full_macs, len(path), certified, notes))
    return out


def collect_scores(staged, heads: dict, x, score: str = "max_softmax", batch: int = 1000) -> ExitScores:
    """Run the staged model and its exit heads on ``x`` (batches of ``batch``) through
    :func:`splitinfer.head.walk`; gather per-exit scores (:func:`splitinfer.head.score_logits`) and
    predictions, and the full model's predictions."""
    import torch

    from splitinfer.torch_head import TorchStages

    boundaries = sorted(heads)
    n_stages = staged.num_stages
    if any(not 0 < b < n_stages for b in boundaries):
        raise ValueError(f"exit boundaries must lie in 1..{n_stages - 1}, got {boundaries}")
    backend = TorchStages(staged, heads)
    conf: list[list[np.ndarray]] = [[] for _ in boundaries]
    pred: list[list[np.ndarray]] = [[] for _ in boundaries]
    full: list[np.ndarray] = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            for step in walk(backend, x[s : s + batch], n_stages, exits=boundaries):
                if step.logits is not None:
                    i = boundaries.index(step.boundary)
                    scored = score_logits(step.logits, score)
                    conf[i].append(scored.score)
                    pred[i].append(scored.label)
                if step.boundary == n_stages:
                    full.append(step.tensor.argmax(1).numpy())
    macs_to = [staged.macs_between(0, b) for b in boundaries]
    return ExitScores(boundaries, np.stack([np.concatenate(c) for c in conf]),
                      np.stack([np.concatenate(p) for p in pred]), np.concatenate(full), macs_to,
                      [int(heads[b].macs()) for b in boundaries], staged.macs_between(0, n_stages))
