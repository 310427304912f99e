"""Joint planning: the head variant (how the model is compressed) is a search dimension beside the split, the
codec and the exit subset, and every configuration is judged on the system that would ship.

* **Head variants.** ``fp32`` (the committed model) and compressed models written by ``plan compress`` (the
  committed ones in ``splitinfer/weights/variants/<model>/<name>/``, or directories a user names). A variant is
  the whole model as compressed: the edge runs its head, the server its tail (the bundle ships its weights file).
  A variant whose stages hold the same parameter shapes as fp32 (weight-coded: Deep Compression, ternary, mixed
  precision) decodes to dense float32 tensors of the same shapes at load and runs the same kernels: its measured
  profile is fp32's (not measured again). Others (low rank, pruned) are timed together with fp32, interleaved
  (:func:`profile_variants`).
* **Measured per variant** on the validation images: the exits' scores on the variant's own features, the
  variant's answers with every codec at every split it may use (each sample encoded alone, as the edge does:
  ``UInt8AffineCodec.roundtrip_each``, the learned codec's quantized latent, the image codec's files), and the
  full fp32 model's answers (the reference).
* **Dominated variants are pruned per split before combining**: at split ``k`` variant ``v`` is dropped when
  another variant ``w`` is no worse in every dimension that can matter and better in one: the head's edge time
  up to ``k``, the tail's server time from ``k``, the full-model disagreement with fp32 (the variant's own
  accuracy cost), and, only when the user constrains them, the head's memory and the bundle's bytes. Exit
  behaviour is not a dimension (exits run on the variant's features; their rates are measured only for the
  survivors). With no bundle or memory limit the weight-coded variants are dominated by fp32 everywhere.
* **End to end.** A configuration's disagreement is that of its final answers (an exit's when one fires, else
  the variant's head -> codec -> tail) with the full fp32 model, measured on the validation images; the search
  admits it when the one-sided upper confidence bound (Clopper-Pearson at ``delta``) of that rate is at most
  ``epsilon``. The exits' thresholds during the search are calibrated (Learn-then-Test, one greedy path) per
  variant at several shares of ``epsilon`` (:data:`SEARCH_SHARES`: the variant and its exits together within the
  share, the rest left for the codec); each share is its own configuration (``exit_share``). The chosen
  configuration is then calibrated again on exactly the system that ships, on every validation image
  (:func:`system_scores`, :meth:`JointResult.certify_choice`): Learn-then-Test on the final answers at
  ``delta`` and ``epsilon`` (or a fraction of it, when the thresholds certified at ``epsilon`` would break another
  constraint such as the accuracy drop): that certificate is the plan's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from partitioner.profile import Profile, StageTimes
from partitioner.search import Constraints, Objective, Planner, choose_among, metric, pareto_front, ranked
from splitinfer.bundle import SplitEstimate
from splitinfer.calibration import (
    Calibration,
    CalibrationTooSmall,
    ExitScores,
    apply,
    binom_upper_bound,
    calibrate,
    calibrate_each,
    collect_scores,
    min_calibration_samples,
)
from splitinfer.staged import StagedModel

LEARNED_BYTES_SAMPLES = 100  # a learned codec's payload size per variant: mean over this many samples coded alone
# the search's exit calibrations per variant, as shares of epsilon for the variant and its exits together (the
# rest is left for the codec): edge-only configurations can use it all, offloading ones need room for the codec
SEARCH_SHARES = (0.5, 0.8, 1.0)  # the exits' share of epsilon during the search (the head and codec get the rest)


# --------------------------------------------------------------------------------------------------- variants


@dataclass
class HeadVariant:
    """One way to compress the model: the model itself and what its bundle ships."""

    name: str
    net: torch.nn.Module
    staged: StagedModel
    weights_data: bytes | None  # the weights file the bundle ships (None: fp32 safetensors of ``net``)
    recipe: dict | None  # ``plan.model.compression`` (None: fp32)
    weights_bytes: int
    same_arch: bool  # same parameter shapes per stage as fp32: fp32's latency profile applies
    source: str


def variants_dir(model: str) -> Path:
    """Where an embedded model's committed compressed variants live."""
    from partitioner.weights import weights_dir

    return weights_dir() / "variants" / model


def committed_variants(model: str) -> list[Path]:
    """The committed compressed variants of ``model`` (directories written by ``plan compress``)."""
    root = variants_dir(model)
    return sorted(p for p in root.iterdir() if (p / "compression.json").is_file()) if root.is_dir() else []


def _state_bytes(net: torch.nn.Module) -> int:
    from safetensors.torch import save

    return len(save({k: v.detach().contiguous() for k, v in net.state_dict().items()}))


def _same_arch(a: StagedModel, b: StagedModel) -> bool:
    if a.num_stages != b.num_stages:
        return False
    for sa, sb in zip(a.stages, b.stages, strict=True):
        pa = [tuple(p.shape) for p in sa.parameters()]
        pb = [tuple(p.shape) for p in sb.parameters()]
        if pa != pb:
            return False
    return True


def load_variants(spec: str | Sequence[str], model: str, net: torch.nn.Module, staged: StagedModel
                  ) -> list[HeadVariant]:
    """``fp32`` (``net``) plus the variants ``spec`` names: ``"all"`` (every committed one), ``"none"``, or
    names of committed variants and ``plan compress`` directories (a list, or comma-separated)."""
    from partitioner.target import load_compressed_for

    out = [HeadVariant("fp32", net, staged, None, None, _state_bytes(net), True, "committed weights")]
    if isinstance(spec, str):
        if spec == "none":
            return out
        items = [p.name for p in committed_variants(model)] if spec == "all" else \
            [s.strip() for s in spec.split(",") if s.strip()]
        if spec == "all" and not items:
            raise ValueError(f"model {model} has no committed compressed variants ({variants_dir(model)})")
    else:
        items = list(spec)
    for item in items:
        path = Path(item) if (Path(item) / "compression.json").is_file() else variants_dir(model) / item
        if not (path / "compression.json").is_file():
            names = ", ".join(p.name for p in committed_variants(model)) or "none"
            raise ValueError(f"head variant {item!r} is neither a `plan compress` directory nor a committed variant "
                             f"of {model} (committed: {names})")
        vnet, vstaged, data, recipe = load_compressed_for(path, model)
        name = path.name if path.parent == variants_dir(model) else str(path)
        if any(v.name == name for v in out):
            raise ValueError(f"head variant {name!r} named twice")
        out.append(HeadVariant(name, vnet, vstaged, data, recipe, len(data), _same_arch(staged, vstaged), str(path)))
    return out


# --------------------------------------------------------------------------------------------------- answers


Roundtrip = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (features, their sample indices) -> decoded


def codec_roundtrip(codec) -> Roundtrip:
    """What the receiving side gets for features encoded sample by sample with ``codec``, batched:
    ``roundtrip_each`` of the uint8 and learned codecs (:class:`~splitinfer.codec.UInt8AffineCodec`,
    :class:`~splitinfer.bottleneck.LearnedCodec`); float32 is lossless."""
    if hasattr(codec, "roundtrip_each"):
        return lambda f, _sl: codec.roundtrip_each(f)
    if getattr(codec, "name", "") == "float32":
        return lambda f, _sl: f
    raise ValueError(f"no batched round trip for codec {getattr(codec, 'name', codec)!r}")


def image_roundtrip(spec, images: np.ndarray) -> Roundtrip:
    """The image codec at split 0: each sample as the smaller of its PNG and JPEG-90 file, decoded as the
    server decodes it."""
    from partitioner.make import smaller_file
    from splitinfer.data import render
    from splitinfer.imaging import ImageCodec

    decoder = ImageCodec(spec)
    size = int(spec.shape[-1])
    decoded = []
    for img in render(images, size):
        data = smaller_file(spec, img)
        decoded.append(decoder.decode(data, {"format": "png" if data.startswith(b"\x89PNG") else "jpeg"}))
    x = torch.from_numpy(np.concatenate([np.asarray(d, dtype=np.float32) for d in decoded]))
    return lambda _f, sl: x[sl]


def lazy_roundtrip(make: Callable[[], Roundtrip]) -> Roundtrip:
    """A round trip built on its first use (the image codec's files cost ~0.5 ms a sample to write and read
    back; most plans never judge a cloud-only configuration that sends them)."""
    built: list[Roundtrip] = []

    def roundtrip(f: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:
        if not built:
            built.append(make())
        return built[0](f, sl)
    return roundtrip


def split_answers(staged: StagedModel, x: torch.Tensor, wanted: dict[str, tuple[Sequence[int], Roundtrip]],
                  batch: int = 1000, rows: np.ndarray | None = None) -> dict[tuple[int, str], np.ndarray]:
    """The model's answers when its features at boundary ``k`` cross the link with codec ``name``, for every
    ``k`` in ``wanted[name][0]`` below the last boundary (the head runs once, up to the deepest such ``k``).
    ``rows``: only these samples of ``x`` (answers in that order); a round trip gets their indices in ``x``."""
    n = staged.num_stages
    deepest = max((k for splits, _ in wanted.values() for k in splits if k < n), default=-1)
    index = torch.arange(len(x)) if rows is None else torch.as_tensor(np.asarray(rows, dtype=np.int64))
    parts: dict[tuple[int, str], list[np.ndarray]] = {}
    with torch.inference_mode():
        for s in range(0, len(index), batch):
            sl = index[s : s + batch]
            f = x[sl]
            for k in range(deepest + 1):
                for name, (splits, roundtrip) in wanted.items():
                    if k in splits:
                        out = staged.run(roundtrip(f, sl), k, n)
                        parts.setdefault((k, name), []).append(out.argmax(1).numpy())
                if k < deepest:
                    f = staged.stages[k](f)
    return {key: np.concatenate(v) for key, v in parts.items()}


# --------------------------------------------------------------------------------------------------- per variant


@dataclass
class VariantEval:
    """A head variant measured for planning."""

    variant: HeadVariant
    edge: Profile
    server: Profile
    # exits on the variant's features (screening images); fallback: its own full answers; reference: fp32's
    scores: ExitScores | None
    agreement: float  # the variant's full answers vs fp32's (screening images)
    # the system's answers on the screening images, per (split, codec), computed when first judged;
    # (N, "edge"): the variant's own
    answers: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    answered: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # which rows of a partial entry are known
    roundtrips: dict[str, Roundtrip] = field(default_factory=dict)
    calibrations: dict[float, Calibration] = field(default_factory=dict)  # share of epsilon -> the search's
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.variant.name

    def thresholds(self, share: float) -> dict[int, float]:
        """The search's exit thresholds at ``share`` of epsilon."""
        cal = self.calibrations[share]
        return dict(zip(cal.boundaries, cal.thresholds, strict=True))


def scaled_profile(given: Profile, fp32_here: Profile, variant_here: Profile) -> Profile:
    """A variant's profile on a machine where only fp32 was profiled (``given``): every stage's time scaled by
    the variant's / fp32's time measured here; sizes and memory are the variant's."""
    import dataclasses

    ratio = [v / f if f > 0 else 1.0 for v, f in zip(variant_here.stage_ms, fp32_here.stage_ms, strict=True)]
    return dataclasses.replace(given, stage_ms=[g * r for g, r in zip(given.stage_ms, ratio, strict=True)],
                               stage_macs=list(variant_here.stage_macs), stage_params=list(variant_here.stage_params),
                               head_peak_bytes=list(variant_here.head_peak_bytes), stage_ms_stats=[],
                               batch_stage_ms={})


def variant_profile(base: Profile, variant: HeadVariant, exits: dict, times: StageTimes) -> Profile:
    """A variant's profile on this machine from fp32's (``base``, measured here) and the variant's stage and exit
    times (``times``: :func:`partitioner.profile.time_stages_interleaved`, batch 1, 1 thread, every exit evaluated
    between the stages; their medians); the boundaries' shapes are fp32's, so the codec columns are fp32's; its
    head's memory is its own."""
    from partitioner.profile import head_peak_bytes

    st = variant.staged
    return dataclasses.replace(base, stage_ms=[x.p50 for x in times.stages], stage_ms_stats=list(times.stages),
                               batch_stage_ms={}, exit_ms={b: x.p50 for b, x in times.exits.items()},
                               stage_macs=[i.macs for i in st.stage_info],
                               stage_params=[i.params for i in st.stage_info],
                               head_peak_bytes=head_peak_bytes(st, exits), model=f"{base.model} ({variant.name})")


def profile_variants(variants: Sequence[HeadVariant], edge: Profile, server: Profile, exits: dict,
                     example: torch.Tensor, repeats: int, given: bool, fp32_here: Callable[[], Profile]
                     ) -> dict[str, tuple[Profile, Profile]]:
    """Every variant's (edge, server) profiles. fp32 (``variants[0]``) and the variants whose stage shapes differ
    from fp32's are timed together, interleaved (:func:`partitioner.profile.time_stages_interleaved`, ``4 *
    repeats`` walks each), so that their ranking does not hang on when each was timed; same-shape variants get
    fp32's profiles. Profiles measured here (``given`` False) take those times directly, fp32's included;
    profiles of another machine (``given``) are scaled stage by stage by the variant's / fp32's times here
    (``fp32_here``: fp32's full profile here, for its other columns)."""
    from partitioner.profile import time_stages_interleaved

    fp32 = variants[0]
    timed = [fp32, *(v for v in variants[1:] if not v.same_arch)]
    out = {v.name: (edge, server) for v in variants}
    if len(timed) == 1:
        return out
    times = time_stages_interleaved({v.name: v.staged for v in timed}, exits, example, 4 * repeats)
    if not given:
        here = variant_profile(edge, fp32, exits, times[fp32.name])
        out = {v.name: (here, here) for v in variants}
        for v in timed[1:]:
            p = variant_profile(edge, v, exits, times[v.name])
            out[v.name] = (p, p)
        return out
    base = fp32_here()
    ref = variant_profile(base, fp32, exits, times[fp32.name])
    for v in timed[1:]:
        p = variant_profile(base, v, exits, times[v.name])
        out[v.name] = (scaled_profile(edge, ref, p), scaled_profile(server, ref, p))
    return out


def measure_variant(variant: HeadVariant, exits: dict, x_screen: torch.Tensor, reference: np.ndarray, score: str,
                    profiles: Callable[[HeadVariant], tuple[Profile, Profile]],
                    scores: ExitScores | None = None) -> VariantEval:
    """Phase 1, every variant: its profiles, its exits' scores on the screening images (fallback: its own
    answers; reference: fp32's) and its agreement with fp32 there."""
    t0 = time.perf_counter()
    edge, server = profiles(variant)
    t1 = time.perf_counter()
    scores = scores or collect_scores(variant.staged, exits, x_screen, score)
    ev = VariantEval(variant, edge, server, scores.with_fallback(scores.full_pred, reference),
                     float((scores.full_pred == reference).mean()))
    ev.answers[(variant.staged.num_stages, "edge")] = scores.full_pred
    ev.seconds = {"profile": t1 - t0, "scores": time.perf_counter() - t1}
    return ev


def calibrate_variant(ev: VariantEval, epsilon: float, delta: float, score: str, seed: int, mode: str) -> None:
    """Phase 2, the variants that survive screening: the search's exit thresholds on the screening images, one
    set per share of epsilon in :data:`SEARCH_SHARES` (the variant and its exits together within that share;
    the head's codec gets the rest), all from one greedy path."""
    t1 = time.perf_counter()
    epsilons = [epsilon * share for share in SEARCH_SHARES]
    try:
        if mode == "certified":
            cals = calibrate_each(ev.scores, epsilons, delta, score=score, seed=seed)
        else:
            cals = [calibrate(ev.scores, e, delta, score=score, seed=seed, mode=mode) for e in epsilons]
    except CalibrationTooSmall:
        cals = [None] * len(epsilons)
    ev.calibrations = {share: cal or _no_exits(ev.scores, eps, delta, score, "the variant alone cannot be certified")
                       for share, eps, cal in zip(SEARCH_SHARES, epsilons, cals, strict=True)}
    ev.seconds["calibrate"] = time.perf_counter() - t1


def _no_exits(scores: ExitScores, epsilon: float, delta: float, score: str, why: str) -> Calibration:
    k = len(scores.boundaries)
    return Calibration("certified", score, epsilon, delta, list(scores.boundaries), [math.inf] * k, 0, scores.n,
                       0, None, None, [0.0] * k, float(scores.full_macs), scores.full_macs, 0, 0, [why])


def pareto_mask(rows: Sequence[Sequence[float]]) -> list[bool]:
    """True for every row not dominated (no other row <= in every column and < in one)."""
    out = []
    for i, a in enumerate(rows):
        out.append(not any(j != i and all(x <= y for x, y in zip(b, a, strict=True)) and list(b) != list(a)
                           for j, b in enumerate(rows)))
    return out


def undominated_splits(evals: Sequence[VariantEval], splits: Sequence[int], constraints: Constraints,
                       edge_slowdown: float = 1.0) -> dict[str, list[int]]:
    """Per variant, the candidate splits where no other variant dominates it (module docstring)."""
    keep: dict[str, list[int]] = {ev.name: [] for ev in evals}
    for k in splits:
        rows = []
        for ev in evals:
            row = [edge_slowdown * sum(ev.edge.stage_ms[:k]), sum(ev.server.stage_ms[k:]), 1.0 - ev.agreement]
            if constraints.max_edge_memory is not None and ev.edge.head_peak_bytes:
                row.append(float(ev.edge.head_peak_bytes[k]))
            if constraints.max_bundle_bytes is not None:
                row.append(float(ev.variant.weights_bytes))
            rows.append(row)
        for ev, ok in zip(evals, pareto_mask(rows), strict=True):
            if ok:
                keep[ev.name].append(k)
    return keep


# --------------------------------------------------------------------------------------------------- the system


@dataclass
class SystemJudge:
    """End-to-end figures of configurations of one variant: final answers vs the fp32 model's on the screening
    images, with that variant's exit thresholds. A configuration's answers are computed when it is first
    judged (the search judges only configurations it is about to choose or list)."""

    ev: VariantEval
    x_screen: torch.Tensor
    labels: np.ndarray | None
    delta: float
    thresholds: dict[int, float]
    _cache: dict[tuple, tuple[float, float, float | None]] = field(default_factory=dict)
    _where: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def scores(self) -> ExitScores:
        return self.ev.scores

    def _exits(self, subset: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if subset not in self._where:
            s = self.scores
            lam = [self.thresholds[b] if b in subset else math.inf for b in s.boundaries]
            where, answer = apply(s, lam)
            self._where[subset] = (where < len(s.boundaries), answer)
        return self._where[subset]

    def fallback(self, k: int, codec: str, need: np.ndarray | None = None) -> np.ndarray:
        """The variant's answers at split ``k`` with ``codec`` when no exit fires (screening images): those rows
        of ``need`` (a boolean mask; default: every row) are right, the others may be unknown (-1). Rows are
        computed when first needed: a configuration whose exits answer most requests costs a tail run on the
        rest only."""
        ev = self.ev
        n = ev.variant.staged.num_stages
        key = (n, "edge") if k == n else (k, codec)
        if key in ev.answers and key not in ev.answered:
            return ev.answers[key]  # complete
        size = len(self.x_screen)
        need = np.ones(size, dtype=bool) if need is None else need
        if key not in ev.answers:
            ev.answers[key] = np.full(size, -1, dtype=np.int64)
            ev.answered[key] = np.zeros(size, dtype=bool)
        missing = np.flatnonzero(need & ~ev.answered[key])
        if len(missing):
            ev.answers[key][missing] = split_answers(ev.variant.staged, self.x_screen,
                                                     {codec: ([k], ev.roundtrips[codec])}, rows=missing)[key]
            ev.answered[key][missing] = True
            if ev.answered[key].all():
                del ev.answered[key]
        return ev.answers[key]

    def answers(self, k: int, codec: str, subset: tuple[int, ...]) -> np.ndarray:
        """The deployed system's final answer for every screening image."""
        fired, exit_answer = self._exits(subset)
        return np.where(fired, exit_answer, self.fallback(k, codec, ~fired))

    def figures(self, k: int, codec: str, subset: tuple[int, ...]) -> tuple[float, float, float | None]:
        """(disagreement, its upper confidence bound, accuracy drop in points or None without labels)."""
        key = (k, codec, subset)
        if key not in self._cache:
            ans = self.answers(k, codec, subset)
            ref = self.scores.ref
            dis = int((ans != ref).sum())
            y = self.labels
            drop = None if y is None else 100 * (float((ref == y).mean()) - float((ans == y).mean()))
            self._cache[key] = (dis / len(ans), binom_upper_bound(dis, len(ans), self.delta), drop)
        return self._cache[key]

    def known(self, e: SplitEstimate) -> bool:
        """Fill ``e``'s end-to-end figures if this configuration was judged already."""
        if (e.split, e.codec, tuple(e.exits)) in self._cache:
            self(e)
            return True
        return False

    def __call__(self, e: SplitEstimate) -> None:
        dis, bound, drop = self.figures(e.split, e.codec, tuple(e.exits))
        e.disagreement = round(dis, 6)
        e.disagreement_bound = round(bound, 6)
        if drop is not None:
            e.accuracy_drop_points = round(drop, 4)


def system_scores(ev: VariantEval, k: int, codec: str, subset: Sequence[int], exits: dict, x_val: torch.Tensor,
                  reference: np.ndarray, score: str, roundtrip: Roundtrip | None = None,
                  full: ExitScores | None = None) -> ExitScores:
    """The system that ships, on every validation image: the variant's exits in ``subset``; when none fires, its
    head -> codec -> tail; disagreement counted against the fp32 model's answers ``reference``."""
    full = full or collect_scores(ev.variant.staged, exits, x_val, score)
    n = ev.variant.staged.num_stages
    if k == n:
        fallback = full.full_pred
    else:
        fallback = split_answers(ev.variant.staged, x_val, {codec: ([k], roundtrip or ev.roundtrips[codec])})[
            (k, codec)]
    return full.only_exits(sorted(subset)).with_fallback(fallback, reference)


# epsilon' / epsilon tried for the final certificate, most aggressive first (one greedy path for all)
CERTIFY_SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def costliest_part(ev: VariantEval, k: int, codec: str, subset: Sequence[int], judge: SystemJudge) -> str:
    """Which part of a configuration costs the most disagreement with fp32: the head variant, the codec or
    the exits (measured on the validation images)."""
    ref = judge.scores.ref
    head = float((judge.fallback(ev.variant.staged.num_stages, codec) != ref).mean())
    system_no_exit = float((judge.fallback(k, codec) != ref).mean())
    total = judge.figures(k, codec, tuple(subset))[0]
    parts = {f"head variant {ev.name}": head, f"codec {codec}": max(0.0, system_no_exit - head),
             "exits": max(0.0, total - system_no_exit)}
    name = max(parts, key=parts.get)
    return f"{name} ({100 * parts[name]:.2f} % of answers)"


def chosen_summary(e: SplitEstimate) -> str:
    return (f"split {e.split}, head {e.head}, codec {e.codec}, exits {e.exits or 'none'}: "
            f"{e.expected_latency_ms:.3f} ms, {metric(e, 'bytes'):.0f} B/request")



# --------------------------------------------------------------------------------------------------- the search


@dataclass
class JointResult:
    """Joint planning's evidence (every variant's evaluation, the planners) and, after :meth:`certify_choice`,
    the chosen configuration with its end-to-end certificate."""

    evals: list[VariantEval]
    planners: dict[str, Planner]
    kept_splits: dict[str, list[int]]
    learned: dict[str, list]  # variant -> accepted LearnedCandidates
    notes: dict[str, str | float | int]
    search: JointSearch
    inputs: JointInputs
    reference: np.ndarray  # the fp32 model's answers on every validation image
    fp32_scores: ExitScores  # fp32's exits on every validation image
    x_screen: torch.Tensor
    y_screen: np.ndarray | None
    opts: object  # partitioner.make.PlanOptions
    constraints: Constraints  # the user's, plus "certified at epsilon"
    excluded: set[tuple] = field(default_factory=set)  # configurations taken out (failed certificate or limit)
    rejected: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    chosen: SplitEstimate | None = None
    calibration: Calibration | None = None  # the shipped configuration's end-to-end certificate
    system_scores: ExitScores | None = None
    _val_scores: dict[str, ExitScores] = field(default_factory=dict)  # a variant's exits on every validation image
    thresholds: dict[int, float] = field(default_factory=dict)  # shipped: the certified subset's, the search's else
    final: Planner | None = None  # the chosen variant's planner with the shipped thresholds

    @property
    def variant(self) -> VariantEval:
        return next(ev for ev in self.evals if ev.name == self.chosen.head)

    def exclude(self, e: SplitEstimate, why: str) -> None:
        """Take configuration ``e`` out of the search, recording why."""
        self.excluded.add(key_of(e))
        self.rejected.append(f"{chosen_summary(e)}: {why}")

    def certify_choice(self, say: Callable[[str], None] | None = None) -> SplitEstimate:
        """Choose the best configuration not excluded and certify it end to end on every validation image; one
        that cannot be certified is excluded (naming the part that costs most) and the next best is taken."""
        inputs, opts = self.inputs, self.opts
        while True:
            chosen = self.search.choose(opts.link, opts.objective, self.constraints, self.excluded)
            ev = next(x for x in self.evals if x.name == chosen.head)
            rt = image_roundtrip(inputs.spec, inputs.val_images) if chosen.codec == "image" else None
            scores = system_scores(ev, chosen.split, chosen.codec, chosen.exits, inputs.exits, inputs.x_val,
                                   self.reference, inputs.score, rt, self.validation_scores(ev))
            found = self._certify(ev, chosen, scores)
            if found is not None:
                break
            if say:
                say(self.rejected[-1])
        cal, thresholds = found
        from partitioner.make import exit_config_fn

        p = planner_of(self.planners, chosen)
        self.final = Planner(p.codecs, p.splits, exit_config_fn(ev.scores, thresholds, self.y_screen),
                             sorted(inputs.exits), opts.device, opts.edge_slowdown, opts.server_load_rps,
                             head=ev.name, bundle_bytes=p.bundle_bytes, exit_share=chosen.exit_share,
                             system=SystemJudge(ev, self.x_screen, self.y_screen, inputs.delta, thresholds))
        self.chosen, self.calibration, self.system_scores, self.thresholds = chosen, cal, scores, thresholds
        return chosen

    def validation_scores(self, ev: VariantEval) -> ExitScores:
        """``ev``'s exits and own answers on every validation image: fp32's were collected up front; a variant's
        screening images (the first ones) were scored in phase 1, so only the rest run now (once per variant)."""
        if ev.name == "fp32":
            return self.fp32_scores
        if ev.name not in self._val_scores:
            inputs, n_screen = self.inputs, len(self.x_screen)
            screened = dataclasses.replace(ev.scores, reference=None)
            self._val_scores[ev.name] = screened if len(inputs.x_val) <= n_screen else screened.joined(
                collect_scores(ev.variant.staged, inputs.exits, inputs.x_val[n_screen:], inputs.score))
        return self._val_scores[ev.name]

    def _certify(self, ev: VariantEval, chosen: SplitEstimate, scores: ExitScores
                 ) -> tuple[Calibration, dict[int, float]] | None:
        """Learn-then-Test on the chosen system's final answers at epsilon' = epsilon x each of
        :data:`CERTIFY_SHARES` (those the validation images can certify) in turn, until the certified thresholds
        also keep the configuration within the other constraints (e.g. --max-accuracy-drop: a certificate at
        epsilon may use the whole budget for exits); every such certificate bounds the disagreement by
        epsilon' <= epsilon. None (and the configuration excluded, saying why) when no epsilon' works."""
        inputs = self.inputs
        failure = ""
        n_test = scores.n - int(round(scores.n * 0.5))  # calibrate's path fraction
        shares = [sh for sh in CERTIFY_SHARES
                  if min_calibration_samples(inputs.epsilon * sh, inputs.delta) <= n_test]
        epsilons = [inputs.epsilon * sh for sh in shares]
        if inputs.mode == "certified":
            cals = calibrate_each(scores, epsilons, inputs.delta, score=inputs.score, seed=inputs.seed)
        else:
            cals = [calibrate(scores, e, inputs.delta, score=inputs.score, seed=inputs.seed, mode=inputs.mode)
                    for e in epsilons]
        if cals[0] is None:
            why = costliest_part(ev, chosen.split, chosen.codec, chosen.exits, planner_of(self.planners, chosen).system)
            self.exclude(chosen, f"cannot be certified at epsilon {inputs.epsilon}; costliest part: {why}")
            return None
        for eps, cal in zip(epsilons, cals, strict=True):
            if cal is None:
                break
            thresholds = ev.thresholds(chosen.exit_share)
            thresholds.update(zip(cal.boundaries, cal.thresholds, strict=True))
            check = chosen.model_copy()
            check.disagreement = None
            SystemJudge(ev, self.x_screen, self.y_screen, inputs.delta, thresholds)(check)
            if self.constraints.admits(check):
                return cal, thresholds
            failure = (f"with the thresholds certified at epsilon {eps:g} its estimated accuracy drop is "
                       f"{check.accuracy_drop_points} points")
        self.exclude(chosen, f"no certificate keeps it within the constraints ({failure})")
        return None


@dataclass
class JointInputs:
    """Everything joint planning measures on (shared by every variant)."""

    model: str
    exits: dict
    x_val: torch.Tensor
    y_val: np.ndarray | None
    codec: str
    spec: object  # InputSpec
    image_samples: tuple[bytes, ...]
    val_images: np.ndarray | None  # raw images for the image codec's answers (None: no image codec)
    bottlenecks: Sequence = ()
    max_codec_drop: float = 1.0
    epsilon: float = 0.01
    delta: float = 0.05
    score: str = "max_softmax"
    seed: int = 0
    mode: str = "certified"
    repeats: int = 30
    # validation images the search judges configurations on (at least 4x what its exit calibration needs);
    # the certificate uses all of them
    screen_images: int = 1000


def plan_joint(variants: Sequence[HeadVariant], inputs: JointInputs, candidates: Sequence[int], opts,
               edge_profile: Profile | None = None, server_profile: Profile | None = None,
               log: Callable[[str], None] | None = None) -> JointResult:
    """Search (split, head variant, codec, exit subset) jointly (module docstring) at ``opts.link`` under
    ``opts.objective`` and ``opts.constraints`` plus "certified at epsilon" (certified mode), then certify the
    chosen configuration end to end; a configuration whose certificate fails is rejected (naming the part that
    costs most) and the next best is taken."""
    import dataclasses

    from partitioner.make import (
        CodecOption,
        _profiles,
        exit_config_fn,
        image_codec_option,
        learned_candidate,
        learned_option,
        screen_learned,
    )
    from partitioner.profile import profile_model
    from splitinfer.codec import get_codec

    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    fp32 = variants[0]
    edge, server = _profiles(fp32.staged, inputs.exits, inputs.codec, inputs.x_val[:1], opts, edge_profile,
                             server_profile, inputs.model)
    given = edge_profile is not None or server_profile is not None
    timed_profiles = profile_variants(
        variants, edge, server, inputs.exits, inputs.x_val[:1], inputs.repeats, given,
        lambda: profile_model(fp32.staged, inputs.exits, get_codec(inputs.codec), inputs.x_val[:1],
                              repeats=inputs.repeats, threads=1, model_name=inputs.model))
    edge, server = timed_profiles[fp32.name]

    def profiles(v: HeadVariant) -> tuple[Profile, Profile]:
        return timed_profiles[v.name]

    # enough screening images for the search's exit calibration at its share of epsilon (half in its test part)
    need = 4 * min_calibration_samples(inputs.epsilon * min(SEARCH_SHARES), inputs.delta)
    n_screen = min(len(inputs.x_val), max(inputs.screen_images, need))
    x_screen = inputs.x_val[:n_screen]
    y_screen = None if inputs.y_val is None else np.asarray(inputs.y_val[:n_screen])
    fp32_scores = collect_scores(fp32.staged, inputs.exits, inputs.x_val, inputs.score)
    reference = fp32_scores.full_pred
    ref_screen = reference[:n_screen]
    planners: dict[str, Planner] = {}
    learned: dict[str, list] = {}
    notes: dict[str, str | float | int] = {}
    cons = opts.constraints
    if inputs.mode == "certified" and cons.epsilon is None:
        cons = dataclasses.replace(cons, epsilon=inputs.epsilon)
    evals = []
    for v in variants:
        if v is not fp32 and v.same_arch and cons.max_bundle_bytes is None and cons.max_edge_memory is None:
            # fp32's latency and memory, answers at best fp32's: dominated unless bytes or memory are limited
            notes[f"head_variant_{v.name}"] = ("dominated by fp32 (same stage shapes, so the same latency and memory; "
                                               "it matters only under --max-bundle-bytes or --max-edge-memory)")
            continue
        evals.append(measure_variant(v, inputs.exits, x_screen, ref_screen, inputs.score, profiles,
                                     fp32_scores.subset(np.arange(n_screen)) if v is fp32 else None))
        say(f"variant {v.name}: agreement with fp32 {evals[-1].agreement:.4f}")
    t_eval = time.perf_counter()
    screened = []
    for ev in evals:
        # the system's fallback always runs the variant's whole model: a variant that alone disagrees with fp32
        # more often than epsilon (lower confidence bound) cannot be certified at any split
        low = 1.0 - binom_upper_bound(int(round(ev.agreement * n_screen)), n_screen, inputs.delta)
        if cons.epsilon is not None and ev is not evals[0] and low > cons.epsilon:
            notes[f"head_variant_{ev.name}"] = (f"left out: its own answers disagree with fp32's on "
                                                f"{100 * (1 - ev.agreement):.2f} % of the screening images "
                                                f"(lower bound {100 * low:.2f} % > epsilon)")
        else:
            screened.append(ev)
    kept = undominated_splits(screened, candidates, cons, opts.edge_slowdown)
    exit_bytes = _exits_bytes(inputs.exits)
    image_rt = lazy_roundtrip(lambda: image_roundtrip(inputs.spec, inputs.val_images[:n_screen])) \
        if inputs.val_images is not None and inputs.image_samples and 0 in candidates else None
    timed: dict[int, object] = {}
    for ev in screened:
        splits = kept[ev.name]
        if not splits:
            notes[f"head_variant_{ev.name}"] = "dominated at every split by another variant"
            continue
        calibrate_variant(ev, inputs.epsilon, inputs.delta, inputs.score, inputs.seed, inputs.mode)
        # the codec's time depends on its shapes only (a variant's boundaries are fp32's): measured once
        cands = [learned_candidate(ev.variant.staged, bn, x_screen, y_screen, inputs.repeats, limit=n_screen,
                                   bytes_limit=LEARNED_BYTES_SAMPLES, timing_of=timed.get(i),
                                   reference=ev.scores.full_pred)
                 for i, bn in enumerate(inputs.bottlenecks)]
        timed.update({i: c for i, c in enumerate(cands) if i not in timed})
        ok, _codec_notes = screen_learned(cands, splits, inputs.max_codec_drop)
        learned[ev.name] = ok
        codecs = [CodecOption(inputs.codec, ev.edge, ev.server)]
        ev.roundtrips = {inputs.codec: codec_roundtrip(get_codec(inputs.codec))}
        if image_rt is not None and 0 in splits:
            image = image_codec_option(ev.edge, ev.server, inputs.image_samples, inputs.spec)
            if image is not None:
                codecs.append(image)
                ev.roundtrips["image"] = image_rt
        for lc in ok:
            codecs.append(learned_option(ev.edge, ev.server, lc))
            ev.roundtrips[lc.codec.name] = codec_roundtrip(lc.codec)
        codec_bytes = sum(_state_bytes_of(lc.codec.bottleneck.state_for_bundle()) for lc in ok)
        for share in SEARCH_SHARES:
            th = ev.thresholds(share)
            planners[planner_key(ev.name, share)] = Planner(
                codecs, splits, exit_config_fn(ev.scores, th, y_screen), sorted(inputs.exits), opts.device,
                opts.edge_slowdown, opts.server_load_rps, head=ev.name,
                bundle_bytes=ev.variant.weights_bytes + exit_bytes + codec_bytes,
                system=SystemJudge(ev, x_screen, y_screen, inputs.delta, th), exit_share=share)
        notes[f"head_variant_{ev.name}"] = (f"agreement with fp32 {ev.agreement:.4f}, weights "
                                            f"{ev.variant.weights_bytes} B, splits kept {len(splits)}")
    t_scored = time.perf_counter()
    jr = JointResult(evals=evals, planners=planners, kept_splits=kept, learned=learned, notes=notes,
                     search=JointSearch(planners), inputs=inputs, reference=reference, fp32_scores=fp32_scores,
                     x_screen=x_screen, y_screen=y_screen, opts=opts, constraints=cons)
    jr.certify_choice(say)
    t_end = time.perf_counter()
    jr.seconds = {"variants": t_eval - t_start, "scores": t_scored - t_eval,
                  "search_and_certificate": t_end - t_scored, "total": t_end - t_start}
    return jr


def key_of(e: SplitEstimate) -> tuple:
    """A configuration's identity: (head variant, exits' share of epsilon in the search, split, codec, exits)."""
    return (e.head, e.exit_share, e.split, e.codec, tuple(e.exits))


def planner_key(head: str, share: float | None) -> str:
    """The search planner of a head variant with its exits calibrated at ``share`` of epsilon."""
    return f"{head}@{share:g}" if share is not None else head


def planner_of(planners: dict[str, Planner], e: SplitEstimate) -> Planner:
    return planners[planner_key(e.head, e.exit_share)]


@dataclass
class JointSearch:
    """Every head variant's planner searched together; configurations judged end to end only when the search
    is about to choose or list them (:meth:`partitioner.search.Planner.judge`)."""

    planners: dict[str, Planner]

    def evaluate(self, link, excluded: set[tuple] = frozenset()) -> list[SplitEstimate]:
        return [e for p in self.planners.values() for e in p.evaluate(link) if key_of(e) not in excluded]

    def judge(self, e: SplitEstimate) -> None:
        planner_of(self.planners, e).judge(e)

    def choose(self, link, objective: Objective = Objective(), constraints: Constraints = Constraints(),
               excluded: set[tuple] = frozenset()) -> SplitEstimate:
        return choose_among(self.evaluate(link, excluded), objective, constraints, self.judge)

    def pareto(self, link, constraints: Constraints = Constraints(), also: Sequence[Planner] = ()
               ) -> list[SplitEstimate]:
        """The Pareto front (latency, energy, bytes, accuracy drop) of the feasible configurations the search has
        judged end to end so far (choosing and tabulating operating points judge the contenders; judging every
        configuration would cost a tail run per split and variant), in these planners and ``also``."""
        judged = []
        for p in [*self.planners.values(), *also]:
            judged += [e for e in p.evaluate(link) if p.system is not None and p.system.known(e)
                       and constraints.admits(e)]
        return pareto_front(judged)

    def table(self, link, objective: Objective, constraints: Constraints) -> list[SplitEstimate]:
        """For every (split, codec): the best configuration (head variant, exits) under the constraints. End-to-end
        figures are shown where the search judged the configuration (choosing, listing the Pareto front or the
        operating points); elsewhere they stay empty (judging every split would cost a tail run per split)."""
        groups: dict[tuple[int, str], list[SplitEstimate]] = {}
        for e in self.evaluate(link):
            groups.setdefault((e.split, e.codec), []).append(e)
        out = []
        for key in sorted(groups):
            order = ranked([e for e in groups[key] if constraints.admits(e)] or groups[key], objective)
            for e in order:
                known = planner_of(self.planners, e).system.known(e)
                if not known or constraints.admits(e):
                    break
            out.append(e)
        return out


def _state_bytes_of(state: dict) -> int:
    from safetensors.torch import save

    return len(save({k: v.detach().contiguous() for k, v in state.items()}))


def _exits_bytes(exits: dict) -> int:
    """The bytes of the bundle's exits file (as save_bundle writes it)."""
    tensors = {f"{b}.{k}": v for b in sorted(exits) for k, v in exits[b].state_dict().items()}
    return _state_bytes_of(tensors) if tensors else 0


def bundle_files_bytes(plan, variant: HeadVariant, exits: dict, codec_states: dict) -> int:
    """The bytes of every file :func:`splitinfer.bundle.save_bundle` writes for this plan: weights, exits,
    codecs and plan.json."""
    return (variant.weights_bytes + _exits_bytes(exits) + sum(_state_bytes_of(s) for s in codec_states.values())
            + len(plan.model_dump_json(indent=2)) + 1)
