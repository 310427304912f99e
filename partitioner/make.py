"""``splitinfer plan make``: profile, estimate every split, choose one and write the bundle."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from partitioner.auto_bottleneck import AutoBottlenecks
from partitioner.cost import Link
from partitioner.profile import Profile, profile_model
from partitioner.search import CodecOption, Constraints, ExitConfig, Objective, Planner, best
from partitioner.target import load_compressed_for
from partitioner.train import model_input, split_train_validation
from partitioner.weights import load_default
from splitinfer.bottleneck import Bottleneck, LearnedCodec
from splitinfer.bundle import (
    CodecSpec,
    ExitCalibrationSpec,
    ExitSpec,
    InputSpec,
    LatencyCurve,
    OperatingPoint,
    Plan,
    SplitEstimate,
    new_plan,
    save_bundle,
)
from splitinfer.calibration import Calibration, ExitScores, apply, calibrate, collect_scores, evaluate
from splitinfer.codec import get_codec
from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, render
from splitinfer.energy import DeviceProfile
from splitinfer.models import embedded_model
from splitinfer.timing import time_calls, time_codec

# The operating-point table's grid (bit/s, s). The agent picks the cell nearest its link estimate in log space,
# so neighbouring RTTs must not be too far apart: on a slow edge the agent's own gRPC work adds ~5 ms to the RTT
# it measures, and with only 5 and 20 ms an estimate of 10-14 ms on a 5 ms link fell in the 20 ms row.
GRID_BANDWIDTHS = (0.25e6, 0.5e6, 1e6, 2e6, 5e6, 10e6, 20e6, 50e6, 100e6, 200e6)
GRID_RTTS = (0.002, 0.005, 0.010, 0.020, 0.050, 0.100, 0.150)


@dataclass
class PlanResult:
    plan: Plan
    profile: Profile
    estimates: list[SplitEstimate]
    chosen: SplitEstimate
    validation_agreement: float
    path: Path
    server_profile: Profile | None = None
    pareto: list[SplitEstimate] | None = None
    planner: Planner | None = None
    joint: object | None = None  # partitioner.joint.JointResult when planned over head variants


def _candidates(n: int, splits: str) -> list[int]:
    if splits == "all":
        return list(range(n + 1))
    if splits == "interior":
        return list(range(1, n))
    raise ValueError("splits must be 'all' or 'interior'")


def per_split(planner: Planner, link: Link, objective: Objective, constraints: Constraints) -> list[SplitEstimate]:
    """For every (split, codec): its best exit subset under ``objective`` (feasible ones first)."""
    return best_per_split(planner.evaluate(link), objective, constraints)


def best_per_split(estimates: Sequence[SplitEstimate], objective: Objective, constraints: Constraints
                   ) -> list[SplitEstimate]:
    """For every (split, codec) among ``estimates``: the best one (head variant, exit subset) under
    ``objective``, feasible ones first."""
    groups: dict[tuple[int, str], list[SplitEstimate]] = {}
    for e in estimates:
        groups.setdefault((e.split, e.codec), []).append(e)
    out = []
    for key in sorted(groups):
        ok = [e for e in groups[key] if constraints.admits(e)]
        out.append(best(ok or groups[key], objective))
    return out


def exit_config_fn(scores: ExitScores, thresholds: dict[int, float], labels: np.ndarray):
    """Exit rates, accuracy drop (points) and agreement of any subset of the calibrated exits, on validation
    data (exits outside the subset never fire)."""
    y = np.asarray(labels)
    full_acc = float((scores.full_pred == y).mean())

    def config(subset: tuple[int, ...]) -> ExitConfig:
        lam = [thresholds[b] if b in subset else math.inf for b in scores.boundaries]
        out = evaluate(scores, lam)
        _, answer = apply(scores, lam)
        rates = {b: r for b, r in zip(scores.boundaries, out.exit_rates, strict=True) if b in subset}
        return ExitConfig(exits=subset, rates=rates, drop_points=100 * (full_acc - float((answer == y).mean())),
                          agreement=1.0 - out.disagreement)

    return config


def calibration_spec(cal: Calibration, scores: ExitScores) -> ExitCalibrationSpec:
    """The plan's record of a calibration, with the drift monitor's reference deciles of the first exit."""
    first = scores.conf[0] if len(scores.conf) else np.zeros(0)
    edges = [float(v) for v in np.quantile(first, np.linspace(0.1, 0.9, 9))] if first.size else []
    return ExitCalibrationSpec(
        mode=cal.mode, score=cal.score, epsilon=cal.epsilon, delta=cal.delta, n_path=cal.n_path, n_test=cal.n_test,
        disagreements=cal.disagreements, p_value=cal.p_value, upper_bound=cal.upper_bound,
        exit_rates={b: round(r, 5) for b, r in zip(cal.boundaries, cal.exit_rates, strict=True)},
        first_exit_conf_edges=edges, notes=cal.notes)


def _agreement(scores: ExitScores, thresholds: dict[int, float], active: list[int]) -> float:
    lam = [thresholds[b] if b in active else math.inf for b in scores.boundaries]
    return 1.0 - evaluate(scores, lam).disagreement


@dataclass
class LearnedCandidate:
    """A trained bottleneck as a planning candidate: its codec, measured costs and validation figures."""

    codec: LearnedCodec
    drop_points: float
    agreement: float
    notes: dict[str, float | int | str]

    @property
    def boundary(self) -> int:
        return self.codec.boundary


def learned_candidate(staged, bn: Bottleneck, x_val, y_val, repeats: int, limit: int = 2000,
                      bytes_limit: int | None = None, timing_of: LearnedCandidate | None = None,
                      reference: np.ndarray | None = None) -> LearnedCandidate:
    """Measure bottleneck ``bn`` as a candidate: its bytes, time (means, as the profile's) and accuracy on the
    validation images (every sample encoded alone, as the edge does; ``bytes_limit``: batched, see
    :func:`splitinfer.bottleneck.evaluate_codec`); ``timing_of``: the same codec measured already (the same
    shapes: its encode and decode times are reused); ``reference``: the model's own answers on ``x_val``, when
    known (they are not computed again). Without labels (``y_val`` None: a
    torchvision or user model) the drop is bounded by the disagreement with the model: 100 x (1 - agreement)
    points, an upper bound of the accuracy drop whatever the labels."""
    from partitioner.codec import evaluate_codec

    codec = timing_of.codec if timing_of is not None else LearnedCodec(bn)
    k = codec.boundary
    n = min(limit, len(x_val))
    ev = evaluate_codec(staged, codec, k, x_val[:n], None if y_val is None else np.asarray(y_val[:n], dtype=np.int64),
                        bytes_limit=bytes_limit, reference=None if reference is None else reference[:n])
    if timing_of is None:
        timing = time_codec(codec, staged.run(x_val[:1], 0, k).detach(), runs=max(10, repeats), warmup=1)
        encode_ms, decode_ms = timing.encode_ms, timing.decode_ms
    else:
        encode_ms, decode_ms = float(timing_of.notes["encode_ms"]), float(timing_of.notes["decode_ms"])
    labelled = ev.accuracy is not None and ev.reference_accuracy is not None
    drop = 100 * (ev.reference_accuracy - ev.accuracy) if labelled else 100 * (1 - ev.agreement)
    notes: dict[str, float | int | str] = {"name": codec.name, "boundary": k, "bytes_mean": round(ev.bytes_mean, 2),
                                           "fp32_bytes": int(staged.boundaries[k].fp32_bytes)}
    if labelled:
        notes["validation_accuracy"] = round(ev.accuracy, 5)
    notes.update({"validation_agreement": round(ev.agreement, 5),
                  ("validation_drop_points" if labelled else "drop_bound_points"): round(drop, 3),
                  "encode_ms": round(encode_ms, 4), "decode_ms": round(decode_ms, 4)})
    return LearnedCandidate(codec=codec, drop_points=drop, agreement=ev.agreement, notes=notes)


def screen_learned(candidates: Sequence[LearnedCandidate], splits: Sequence[int], max_drop: float,
                   ) -> tuple[list[LearnedCandidate], dict[str, str | float | int]]:
    """The candidates the planner may use (validation drop at most ``max_drop`` points, boundary among the
    candidate splits) and plan notes for every one: ``learned_codec_<B>_<figure>``, and
    ``learned_codec_<B>_rejected`` saying why one was left out."""
    kept, notes = [], {}
    for lc in candidates:
        k = lc.boundary
        notes.update({f"learned_codec_{k}_{key}": v for key, v in lc.notes.items() if key not in ("name", "boundary")})
        if lc.drop_points > max_drop:
            what = "validation accuracy drop" if "validation_drop_points" in lc.notes else \
                "disagreement with the model (bounds the accuracy drop)"
            notes[f"learned_codec_{k}_rejected"] = f"{what} {lc.drop_points:.2f} points > {max_drop}"
        elif k not in splits:
            notes[f"learned_codec_{k}_rejected"] = f"boundary {k} is not a candidate split"
        else:
            kept.append(lc)
    if candidates:
        notes["learned_codec_boundaries"] = ",".join(str(lc.boundary) for lc in candidates)
    return kept, notes


def smaller_file(spec: InputSpec, pixels: np.ndarray) -> bytes:
    """The pixels as a user's camera would send them: PNG or JPEG quality 90, whichever is smaller."""
    from splitinfer.imaging import ImageCodec

    files = [ImageCodec(spec, fmt=fmt, quality=90).encode(pixels)[0] for fmt in ("png", "jpeg")]
    return min(files, key=len)


def image_codec_option(edge: Profile, server: Profile, images: Sequence[bytes], spec) -> CodecOption | None:
    """Cloud-only by sending the input file (codec ``image`` at split 0): payload = the files' mean size; edge
    cost = encoding the pixels again in the files' format (what the agent does when it has no file to
    forward; forwarding an upload costs less); server cost = decoding; both measured here on the samples (means
    of one timed call per sample, after one untimed call per sample)."""
    import dataclasses
    import io
    import statistics

    from PIL import Image

    from splitinfer.imaging import ImageCodec

    if not images:
        return None
    files = list(images)[:64]
    metas = [{"format": "png" if data.startswith(b"\x89PNG") else "jpeg"} for data in files]
    decoder = ImageCodec(spec)
    # the warm-up decodes every sample once, and refuses samples the server would refuse
    decode_stats = time_calls(lambda i: decoder.decode(files[i], metas[i]), runs=len(files), warmup=len(files))
    pixels = []
    for data in files:
        with Image.open(io.BytesIO(data)) as im:
            pixels.append(np.asarray(im.convert("L" if int(spec.shape[0]) == 1 else "RGB")))
    encoders = {m["format"]: ImageCodec(spec, fmt=m["format"], quality=90) for m in metas}
    encode_stats = time_calls(lambda i: encoders[metas[i]["format"]].encode(pixels[i]), runs=len(files),
                              warmup=len(files))

    def at_zero(prof: Profile, encode_ms: float, decode_ms: float) -> Profile:
        p = dataclasses.replace(prof, encode_ms=list(prof.encode_ms), decode_ms=list(prof.decode_ms),
                                payload_bytes=list(prof.payload_bytes))
        p.payload_bytes[0] = int(round(statistics.fmean(len(d) for d in images)))
        p.encode_ms[0], p.decode_ms[0] = encode_ms, decode_ms
        return p

    decode, encode = decode_stats.mean, encode_stats.mean
    return CodecOption("image", at_zero(edge, encode, decode), at_zero(server, encode, decode), frozenset({0}))


def learned_option(edge: Profile, server: Profile, lc: LearnedCandidate) -> CodecOption:
    """The planner's option for a learned codec: it applies at its boundary only, with its measured costs,
    accuracy drop and agreement."""
    return CodecOption(lc.codec.name, _with_codec_at(edge, lc), _with_codec_at(server, lc), frozenset({lc.boundary}),
                       lc.drop_points, lc.agreement)


def _with_codec_at(prof: Profile, lc: LearnedCandidate) -> Profile:
    """A copy of ``prof`` whose payload size and codec times at the learned codec's boundary are its own."""
    import dataclasses

    k = lc.boundary
    p = dataclasses.replace(prof, encode_ms=list(prof.encode_ms), decode_ms=list(prof.decode_ms),
                            payload_bytes=list(prof.payload_bytes))
    p.payload_bytes[k] = int(round(float(lc.notes["bytes_mean"])))
    p.encode_ms[k] = float(lc.notes["encode_ms"])
    p.decode_ms[k] = float(lc.notes["decode_ms"])
    return p


def choose_head(staged, plan: Plan, x_val, y_val, head: str, max_drop: float, data_dir: str | None, seed: int,
                calibration_images: int = 256, limit: int = 2000, size: int = 28):
    """Quantize the plan's head to int8 (segments at its exits and split), measure its validation accuracy and
    batch-1 time against fp32; returns the HeadSpec to record and the calibration inputs."""
    import statistics
    import time

    import torch

    from splitinfer.bundle import HeadSpec
    from splitinfer.compression.int8 import int8_head

    train = load_fashion_mnist("train", data_dir)
    tr_idx, _ = split_train_validation(len(train), seed)
    calib = model_input(train.images[tr_idx[:calibration_images]], size)
    cuts = sorted({0, plan.split, *(e.boundary for e in plan.exits if e.boundary < plan.split)})
    q = int8_head(staged, plan.split, calib, cuts)
    n, k = min(limit, len(x_val)), plan.split
    y = np.asarray(y_val[:n])
    with torch.inference_mode():
        ref = staged.run(staged.run(x_val[:n], 0, k), k, staged.num_stages).argmax(1).numpy()
        out = staged.run(q(x_val[:n]), k, staged.num_stages).argmax(1).numpy()
        fp32_head = torch.nn.Sequential(*staged.stages[:k])
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(5):
                for name, fn in (("fp32", fp32_head), ("int8", q)):
                    t0 = time.perf_counter()
                    for i in range(20):
                        fn(x_val[i : i + 1])
                    times[name].append((time.perf_counter() - t0) / 20)
        finally:
            torch.set_num_threads(prev)
    drop = 100 * (float((ref == y).mean()) - float((out == y).mean()))
    fp_ms, q_ms = (statistics.median(times[n_]) * 1e3 for n_ in ("fp32", "int8"))
    notes = {"validation_drop_points": round(drop, 3), "agreement": round(float((out == ref).mean()), 5),
             "fp32_ms": round(fp_ms, 4), "int8_ms": round(q_ms, 4), "speedup": round(fp_ms / q_ms, 3)}
    use = head == "int8" or (drop <= max_drop and fp_ms / q_ms >= 1.05)
    if head == "auto" and not use:
        notes["rejected"] = f"drop {drop:.2f} points (max {max_drop}), speed-up x{fp_ms / q_ms:.2f} (min x1.05)"
    if not use:
        return HeadSpec(kind="fp32", notes=notes), None
    return HeadSpec(kind="int8", cuts=cuts, calibration_images=len(calib), notes=notes), calib


@dataclass
class PlanOptions:
    """How to plan: the link, the edge device, objective and constraints, server load, candidate splits."""

    link: Link
    device: DeviceProfile | None = None
    edge_slowdown: float = 1.0
    splits: str = "all"
    objective: Objective = Objective()
    constraints: Constraints = Constraints()
    server_load_rps: float = 0.0
    repeats: int = 30
    progress: bool = False
    # Sample inputs as users send them (PNG/JPEG files): with them, cloud-only may send the file itself
    # (codec ``image`` at split 0) instead of the uint8 tensor. The default model makes its own PNGs.
    input_images: tuple[bytes, ...] = ()
    # The leakage table (partitioner.privacy.LeakageTable) that --max-leakage and the privacy objective read
    leakage: object | None = None

    def check_leakage(self) -> None:
        """ValueError when --max-leakage or the privacy objective is asked for without a leakage table."""
        if self.leakage is None and (self.constraints.max_leakage is not None or self.objective.uses_privacy):
            raise ValueError("--max-leakage and the privacy objective need a leakage table (--leakage FILE, or "
                             "the model's committed one)")


def _profiles(staged, exits, codec: str, example, opts: PlanOptions, edge_profile: Profile | None,
              server_profile: Profile | None, model_name: str) -> tuple[Profile, Profile]:
    """The edge and server profiles: given (checked against the model) or measured here (1 thread, batch 1)."""
    for p in (edge_profile, server_profile):
        if p is not None:
            p.check_matches(staged)
    if edge_profile is None or server_profile is None:
        here = profile_model(staged, exits, get_codec(codec), example, repeats=opts.repeats, threads=1,
                             model_name=model_name, progress=opts.progress)
        edge_profile = edge_profile or here
        server_profile = server_profile or here
    if edge_profile.codec and edge_profile.codec != codec:
        raise ValueError(f"edge profile measured codec {edge_profile.codec!r}, the plan uses {codec!r}")
    return edge_profile, server_profile


CURVE_BANDWIDTHS = (0.5e6, 2e6, 10e6, 50e6, 200e6)


def latency_curves(planner: Planner, opts: PlanOptions) -> list[LatencyCurve]:
    """Latency vs split (best codec and exits per split, by latency) at several bandwidths, the planned RTT."""
    import dataclasses

    curves = []
    for bw in CURVE_BANDWIDTHS:
        link = dataclasses.replace(opts.link, bandwidth_bps=bw, down_bps=None)
        best_at: dict[int, float] = {}
        for e in planner.evaluate(link):
            if opts.constraints.admits(e):
                best_at[e.split] = min(best_at.get(e.split, math.inf), e.expected_latency_ms)
        splits = sorted(best_at)
        curves.append(LatencyCurve(bandwidth_bps=bw, rtt_ms=opts.link.rtt_s * 1e3, splits=splits,
                                   latency_ms=[round(best_at[k], 4) for k in splits]))
    return curves


def _tables(planner: Planner, opts: PlanOptions) -> tuple[SplitEstimate, list[SplitEstimate], list[SplitEstimate],
                                                          list[OperatingPoint]]:
    chosen = planner.choose(opts.link, opts.objective, opts.constraints)
    estimates = per_split(planner, opts.link, opts.objective, opts.constraints)
    pareto = planner.pareto(opts.link, opts.constraints)
    points = planner.grid(GRID_BANDWIDTHS, GRID_RTTS, opts.objective, opts.constraints, base=opts.link)
    return chosen, estimates, pareto, points


def _objective_record(opts: PlanOptions) -> dict[str, str | float]:
    return {"objective": opts.objective.describe(), "server_load_rps": opts.server_load_rps,
            **{k: float(v) for k, v in opts.constraints.to_dict().items()}}


def _link_notes(opts: PlanOptions, edge: Profile, server: Profile) -> dict[str, str | float | int]:
    leakage = {"leakage_table": f"{opts.leakage.model}: {opts.leakage.attack.get('kind', 'white-box')}"} \
        if opts.leakage is not None else {}
    return {**leakage, "bandwidth_bps": opts.link.bandwidth_bps, "rtt_ms": opts.link.rtt_s * 1e3,
            "loss": opts.link.loss,
            "request_overhead_bytes": opts.link.request_overhead, "edge_slowdown": opts.edge_slowdown,
            "device": opts.device.name if opts.device else "none (no energy estimate)",
            "splits_considered": opts.splits, "edge_profiled_on": f"{edge.machine}, {edge.threads} thread(s)",
            "server_profiled_on": f"{server.machine}, {server.threads} thread(s)"}


def _stage_times(plan: Plan, edge: Profile, server: Profile, slowdown: float) -> None:
    for spec, e_ms, s_ms in zip(plan.stages, edge.stage_ms, server.stage_ms, strict=True):
        spec.edge_ms = round(e_ms * slowdown, 5)
        spec.server_ms = round(s_ms, 5)


def model_validation_images(target, opts: PlanOptions, limit: int = 1000, data_dir: str | None = None):
    """Images to measure a learned codec of a torchvision or user model on: the users' files
    (``opts.input_images``) decoded as the agent decodes uploads, else Fashion-MNIST test images rendered at the
    model's input size (grey replicated to RGB). No labels: the model's classes are its own."""
    if opts.input_images:
        import torch

        from splitinfer.imaging import decode_upload

        return torch.from_numpy(np.concatenate([decode_upload(f, target.input_spec)
                                                for f in opts.input_images[:limit]]))
    from partitioner.codec import fashion_mnist_inputs

    return fashion_mnist_inputs("test", target.input_spec, seed=0, limit=limit, data_dir=data_dir)[0]


def make_model_plan(out: Path, target, opts: PlanOptions, edge_profile: Profile | None = None,
                    server_profile: Profile | None = None, codec: str = "uint8-affine",
                    bottlenecks: Sequence[Bottleneck] = (), max_codec_drop: float = 1.0,
                    auto_bottlenecks: AutoBottlenecks | None = None, data_dir: str | None = None) -> PlanResult:
    """Plan a model without exits (torchvision or a user's model; random weights are fine for timing) and write
    its bundle.

    Learned codecs (``bottlenecks``, e.g. from ``plan train-bottleneck``, or trained here by
    ``auto_bottlenecks`` on Fashion-MNIST rendered at the model's size) are candidates each at its boundary,
    measured on :func:`model_validation_images` against the model's own answers: their drop is bounded by
    the disagreement (with random weights that is agreement with a random teacher, not accuracy)."""
    opts.check_leakage()
    staged = target.staged
    edge, server = _profiles(staged, {}, codec, target.example(), opts, edge_profile, server_profile, target.name)
    codecs = [CodecOption(codec, edge, server)]
    image = image_codec_option(edge, server, opts.input_images, target.input_spec)
    if image is not None:
        codecs.append(image)
    candidates = _candidates(staged.num_stages, opts.splits)
    learned: list[LearnedCandidate] = []
    codec_notes: dict[str, str | float | int] = {}
    if bottlenecks or auto_bottlenecks is not None:
        x_val = model_validation_images(target, opts, data_dir=data_dir)
        if auto_bottlenecks is not None and not bottlenecks:
            from partitioner.codec import fashion_mnist_inputs

            auto_bottlenecks.teacher_weights = target.weights_source
            base = Planner(list(codecs), candidates, device=opts.device, edge_slowdown=opts.edge_slowdown,
                           server_load_rps=opts.server_load_rps)
            link = opts.link
            links = [Link(bw, rtt, link.loss, None, link.request_overhead, link.response_overhead)
                     for bw in GRID_BANDWIDTHS for rtt in GRID_RTTS]
            x_train = fashion_mnist_inputs("train", target.input_spec, seed=0, limit=auto_bottlenecks.train_images,
                                           data_dir=data_dir)[0]
            bottlenecks = auto_bottlenecks.train(base, staged, links, x_train, x_val[:500], None, opts.progress)
            codec_notes.update({f"bottlenecks_auto_{r['boundary']}": f"{r['status']}: {r['reason']}"
                                for r in auto_bottlenecks.report})
        learned = [learned_candidate(staged, bn, x_val, None, opts.repeats) for bn in bottlenecks]
        learned, notes = screen_learned(learned, candidates, max_codec_drop)
        codec_notes.update(notes)
        if target.random_weights:
            codec_notes["learned_codec_figures"] = ("agreement with a random teacher (the model has random "
                                                    "weights), not accuracy")
        codecs += [learned_option(edge, server, lc) for lc in learned]
    planner = Planner(codecs, candidates, device=opts.device, edge_slowdown=opts.edge_slowdown,
                      server_load_rps=opts.server_load_rps, leakage=opts.leakage)
    chosen, estimates, pareto, points = _tables(planner, opts)
    plan = new_plan(target.name, staged, target.input_spec, split=chosen.split, codec=CodecSpec(name=chosen.codec),
                    factory=target.factory,
                    weights_source=None if target.weights_source == "unknown" else target.weights_source,
                    estimates=estimates,
                    operating_points=points, pareto=pareto,
                    learned_codecs=[CodecSpec(name=lc.codec.name, params=lc.codec.cfg.to_params()) for lc in learned],
                    objective=_objective_record(opts), latency_curves=latency_curves(planner, opts),
                    notes={**_link_notes(opts, edge, server), "weights": target.weights_note, **codec_notes})
    _stage_times(plan, edge, server, opts.edge_slowdown)
    path = save_bundle(out, plan, target.model, {},
                       codec_states={lc.boundary: lc.codec.bottleneck.state_for_bundle() for lc in learned})
    return PlanResult(plan=plan, profile=edge, estimates=estimates, chosen=chosen, validation_agreement=1.0,
                      path=path, server_profile=server, pareto=pareto, planner=planner)


def make_default_plan(out: Path, link: Link, device: DeviceProfile | None = None, edge_slowdown: float = 1.0,
                      splits: str = "all", epsilon: float = 0.01, delta: float = 0.05, repeats: int = 30,
                      data_dir: str | None = None, weights: Path | None = None, codec: str = "uint8-affine",
                      validation_limit: int | None = None, score: str = "max_softmax",
                      calibration_mode: str = "certified", learned_codec: bool = True,
                      max_codec_drop: float = 1.0, head: str = "fp32", max_head_drop: float = 0.5,
                      objective: Objective = Objective(), constraints: Constraints = Constraints(),
                      server_load_rps: float = 0.0, edge_profile: Profile | None = None,
                      server_profile: Profile | None = None, progress: bool = False,
                      input_images: tuple[bytes, ...] = (), model: str = "default",
                      bottlenecks: Sequence[Bottleneck] | None = None,
                      auto_bottlenecks: AutoBottlenecks | None = None,
                      compressed: Path | None = None,
                      head_variants: str | Sequence[str] | None = None,
                      leakage: object | None = None) -> PlanResult:
    """Plan an embedded model (``model``: the default, or another of :data:`splitinfer.models.EMBEDDED_MODELS`)
    for one link condition and write the bundle to ``out``.

    Exit thresholds are calibrated on the validation images (carved from the training set) so that the
    disagreement with the full model is at most ``epsilon`` with probability ``1 - delta`` (certified mode).
    Every subset of the exits is a candidate (a left-out exit never fires, so the guarantee still holds).

    With ``learned_codec`` every learned bottleneck codec is a candidate at its boundary, next to ``codec`` at
    every boundary, provided its accuracy drop on the validation images is at most ``max_codec_drop`` points;
    the bundle then carries every accepted one (an operating point may use any of them). The bottlenecks are
    ``bottlenecks`` when given; else, with ``auto_bottlenecks``, trained here at the boundaries where they are
    predicted to pay most (:mod:`partitioner.auto_bottleneck`); else the model's committed ones.

    ``head``: ``fp32``, ``int8`` (quantize the chosen split's head), or ``auto`` (int8 when it is measured
    faster here and its validation accuracy drop is at most ``max_head_drop`` points).

    ``compressed``: a directory written by ``plan compress`` for this model: the plan runs that compressed
    model (exits and codecs as committed; thresholds calibrated on it), and the bundle ships its weights file.

    ``head_variants``: plan jointly over head variants (:mod:`partitioner.joint`): ``"all"`` (fp32 and every
    committed compressed variant), or names/directories; the certificate then covers the deployed system end to
    end (final answers vs the full fp32 model), and the bundle ships the chosen variant.

    ``edge_profile``/``server_profile``: profiles measured on the two machines (default: measured here).
    ``input_images``: sample files as users send them (default: each validation image as PNG or JPEG quality
    90, whichever is smaller).
    """
    if head not in ("fp32", "int8", "auto"):
        raise ValueError(f"head must be fp32, int8 or auto, not {head!r}")
    opts = PlanOptions(link=link, device=device, edge_slowdown=edge_slowdown, splits=splits, objective=objective,
                       constraints=constraints, server_load_rps=server_load_rps, repeats=repeats, progress=progress,
                       input_images=input_images, leakage=leakage)
    opts.check_leakage()
    if leakage is not None and compressed is not None:
        raise ValueError("--max-leakage / the privacy objective and --compressed: leakage tables are measured on the "
                         "fp32 model, not on compressed ones (not supported yet)")
    size = embedded_model(model).size
    net, staged, exits, info = load_default(weights, model)
    weights_data, recipe = None, None
    if compressed is not None:
        net, staged, weights_data, recipe = load_compressed_for(compressed, model)
    seed = int(info["config"]["seed"])
    train = load_fashion_mnist("train", data_dir)
    _, va_idx = split_train_validation(len(train), seed)
    if validation_limit:
        va_idx = va_idx[:validation_limit]
    x_val = model_input(train.images[va_idx], size)
    y_val = np.asarray(train.labels[va_idx])
    spec = InputSpec(shape=[1, size, size], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
                     labels=FASHION_MNIST_CLASSES)
    if head_variants is None and constraints.max_bundle_bytes is not None:
        raise ValueError("--max-bundle-bytes needs --head-variants (e.g. all): only joint planning weighs the "
                         "bundle's size")
    if head_variants is not None:
        if leakage is not None:
            raise ValueError("--max-leakage / the privacy objective and --head-variants: leakage tables are measured "
                             "on the fp32 head, not on compressed variants (not supported yet)")
        if compressed is not None:
            raise ValueError("--compressed and --head-variants: name the compressed directory among --head-variants")
        if head != "fp32":
            raise ValueError("--head int8/auto applies to single-variant planning; with --head-variants the head "
                             "is one of the variants")
        from partitioner.joint import JointInputs, load_variants

        if bottlenecks is None and learned_codec:
            from partitioner.codec import load_bottlenecks
            from partitioner.weights import weights_dir

            bottlenecks = [bn for bn, _ in load_bottlenecks(Path(weights) if weights else weights_dir(), model,
                                                              staged=staged).values()]
        samples = opts.input_images or tuple(smaller_file(spec, img)
                                             for img in render(train.images[va_idx][:256], size))
        inputs = JointInputs(model=model, exits=exits, x_val=x_val, y_val=y_val, codec=codec, spec=spec,
                             image_samples=samples, val_images=train.images[va_idx],
                             bottlenecks=list(bottlenecks or []) if learned_codec else [],
                             max_codec_drop=max_codec_drop, epsilon=epsilon, delta=delta, score=score, seed=seed,
                             mode=calibration_mode, repeats=repeats)
        return make_joint_plan(out, load_variants(head_variants, model, net, staged), inputs, opts, info,
                               edge_profile, server_profile, len(va_idx))
    scores = collect_scores(staged, exits, x_val, score)
    cal = calibrate(scores, epsilon, delta, score=score, mode=calibration_mode, seed=seed)
    thresholds = dict(zip(cal.boundaries, cal.thresholds, strict=True))

    edge, server = _profiles(staged, exits, codec, x_val[:1], opts, edge_profile, server_profile, model)
    candidates = _candidates(staged.num_stages, splits)
    codecs = [CodecOption(codec, edge, server)]
    samples = opts.input_images or tuple(smaller_file(spec, img) for img in render(train.images[va_idx][:256], size))
    image = image_codec_option(edge, server, samples, spec)
    if image is not None:
        codecs.append(image)
    exit_config = exit_config_fn(scores, thresholds, y_val)
    if learned_codec and bottlenecks is None and auto_bottlenecks is not None:
        tr_idx, _ = split_train_validation(len(train), seed)
        base = Planner(list(codecs), candidates, exit_config, sorted(exits), device, edge_slowdown, server_load_rps)
        links = [Link(bw, rtt, link.loss, None, link.request_overhead, link.response_overhead)
                 for bw in GRID_BANDWIDTHS for rtt in GRID_RTTS]
        bottlenecks = auto_bottlenecks.train(base, staged, links,
                                             model_input(train.images[tr_idx[:auto_bottlenecks.train_images]], size),
                                             x_val, y_val, progress)
    elif learned_codec and bottlenecks is None:
        from partitioner.codec import load_bottlenecks
        from partitioner.weights import weights_dir

        bottlenecks = [bn for bn, _ in load_bottlenecks(Path(weights) if weights else weights_dir(), model,
                                                          staged=staged).values()]
    learned = [learned_candidate(staged, bn, x_val, y_val, repeats, reference=scores.full_pred)
               for bn in (bottlenecks or [])] \
        if learned_codec else []
    learned, codec_notes = screen_learned(learned, candidates, max_codec_drop)
    if auto_bottlenecks is not None:
        codec_notes.update({f"bottlenecks_auto_{r['boundary']}": f"{r['status']}: {r['reason']}"
                            for r in auto_bottlenecks.report})
    codecs += [learned_option(edge, server, lc) for lc in learned]
    planner = Planner(codecs, candidates, exit_config, sorted(exits), device, edge_slowdown, server_load_rps,
                      leakage=opts.leakage)
    chosen, estimates, pareto, points = _tables(planner, opts)
    agreement = _agreement(scores, thresholds, chosen.exits)

    exit_specs = [ExitSpec(boundary=b, threshold=thresholds[b], score=score, hidden=exits[b].hidden,
                           macs=exits[b].macs(), val_exit_rate=round(r, 5))
                  for b, r in zip(cal.boundaries, cal.exit_rates, strict=True)]
    plan = new_plan(
        model, staged, spec,
        split=chosen.split, codec=CodecSpec(name=chosen.codec), exits=exit_specs, active_exits=list(chosen.exits),
        weights_source="committed", compression=recipe,
        active_exit_rates={b: round(r, 5) for b, r in planner.exit_rates(tuple(chosen.exits)).items()},
        learned_codecs=[CodecSpec(name=lc.codec.name, params=lc.codec.cfg.to_params()) for lc in learned],
        exit_calibration=calibration_spec(cal, scores),
        estimates=estimates, operating_points=points, pareto=pareto, objective=_objective_record(opts),
        latency_curves=latency_curves(planner, opts),
        notes={
            **_link_notes(opts, edge, server), "epsilon": epsilon, "delta": delta,
            "validation_images": len(va_idx), "validation_agreement": round(agreement, 5),
            "chosen_exits": ",".join(str(b) for b in chosen.exits),
            "weights_test_accuracy": float(info.get("test_accuracy", 0.0)),
            **codec_notes,
        },
    )
    _stage_times(plan, edge, server, edge_slowdown)
    calib = None
    if head != "fp32" and chosen.split > 0:
        head_spec, calib = choose_head(staged, plan, x_val, y_val, head, max_head_drop, data_dir, seed, size=size)
        plan = plan.model_copy(update={"head": head_spec})
    path = save_bundle(out, plan, net, {b: exits[b] for b in sorted(exits)},
                       codec_states={lc.boundary: lc.codec.bottleneck.state_for_bundle() for lc in learned},
                       head_calibration=calib if plan.head.kind == "int8" else None, weights_data=weights_data)
    return PlanResult(plan=plan, profile=edge, estimates=estimates, chosen=chosen, validation_agreement=agreement,
                      path=path, server_profile=server, pareto=pareto, planner=planner)


MEMORY_ATTEMPTS = 5  # configurations measured against --max-edge-memory before giving up


def make_joint_plan(out: Path, variants, inputs, opts: PlanOptions, info: dict, edge_profile: Profile | None,
                    server_profile: Profile | None, n_validation: int) -> PlanResult:
    """Plan an embedded model jointly over head variants (:func:`partitioner.joint.plan_joint`) and write the
    chosen variant's bundle with the end-to-end certificate.

    ``--max-bundle-bytes`` is checked on the files the bundle will hold (plan.json included) before writing;
    ``--max-edge-memory`` is screened with the computed figure during the search, then measured on the written
    bundle (:mod:`partitioner.head_memory`); a configuration over the limit is excluded and the next best is
    planned, up to :data:`MEMORY_ATTEMPTS` times."""
    from partitioner import head_memory
    from partitioner.joint import key_of, plan_joint

    jr = plan_joint(variants, inputs, _candidates(variants[0].staged.num_stages, opts.splits), opts, edge_profile,
                    server_profile)
    mem_limit = opts.constraints.max_edge_memory
    measured: list[tuple[str, int]] = []
    for _ in range(MEMORY_ATTEMPTS):
        plan, final, codec_states = _joint_plan_object(jr, opts, info, n_validation)
        path = save_bundle(out, plan, jr.variant.variant.net, {b: inputs.exits[b] for b in sorted(inputs.exits)},
                           codec_states=codec_states, weights_data=jr.variant.variant.weights_data)
        if mem_limit is None:
            break
        m = head_memory.measure(path)
        measured.append((f"{final.head} split {final.split}", int(m["head_peak_bytes"])))
        plan.notes["edge_memory_measured_bytes"] = int(m["head_peak_bytes"])
        if m["head_peak_bytes"] <= mem_limit:
            save_bundle(out, plan, jr.variant.variant.net, {b: inputs.exits[b] for b in sorted(inputs.exits)},
                        codec_states=codec_states, weights_data=jr.variant.variant.weights_data)
            break
        # what the computed figure misses (the runtime's own memory: a learned codec's ONNX Runtime sessions, the
        # allocator) is added to every configuration of this variant: those over the limit are not tried
        extra = int(m["head_peak_bytes"]) - (final.edge_memory_bytes or 0)
        why = (f"measured head memory {m['head_peak_bytes']} B > --max-edge-memory {mem_limit} (or its computed "
               f"figure + the {extra} B {final.head}'s bundle measured beyond it)")
        jr.exclude(jr.chosen, why)
        for e in jr.search.evaluate(opts.link):
            if e.head == final.head and (e.edge_memory_bytes or 0) + extra > mem_limit:
                jr.excluded.add(key_of(e))
        try:
            jr.certify_choice()
        except ValueError as exc:
            lowest = min(measured, key=lambda t: t[1])
            raise ValueError(f"--max-edge-memory {mem_limit}: no configuration is left under it (lowest measured: "
                             f"{lowest[0]}, {lowest[1]} B; computed figures miss the runtime's own memory); raise "
                             f"the limit") from exc
    else:
        lowest = min(measured, key=lambda t: t[1])
        raise ValueError(f"--max-edge-memory {mem_limit}: the {MEMORY_ATTEMPTS} best configurations all measured "
                         f"above it (lowest: {lowest[0]}, {lowest[1]} B); raise the limit")
    return PlanResult(plan=plan, profile=jr.variant.edge, estimates=list(plan.estimates), chosen=final,
                      validation_agreement=1.0 - (final.disagreement or 0.0), path=path,
                      server_profile=jr.variant.server, pareto=list(plan.pareto or []), planner=jr.final, joint=jr)


def _joint_plan_object(jr, opts: PlanOptions, info: dict, n_validation: int):
    """The plan of joint planning's current choice (not written), its final estimate and the codec states;
    ValueError when its files would exceed --max-bundle-bytes."""
    import dataclasses

    from partitioner.joint import bundle_files_bytes

    inputs, ev, chosen, cal = jr.inputs, jr.variant, jr.chosen, jr.calibration
    cons = jr.constraints
    joint_opts = dataclasses.replace(opts, constraints=cons)
    points = jr.final.grid(GRID_BANDWIDTHS, GRID_RTTS, opts.objective, cons, base=opts.link)
    final = next(e for e in jr.final.evaluate(opts.link) if e.split == chosen.split and e.codec == chosen.codec
                 and e.exits == chosen.exits)
    jr.final.judge(final)
    estimates = jr.search.table(opts.link, opts.objective, cons)
    pareto = jr.search.pareto(opts.link, cons, also=[jr.final])
    exits, staged = inputs.exits, ev.variant.staged
    thresholds = jr.thresholds
    exit_config = jr.final._exits(tuple(chosen.exits))
    exit_specs = [ExitSpec(boundary=b, threshold=thresholds[b], score=inputs.score, hidden=exits[b].hidden,
                           macs=exits[b].macs(), val_exit_rate=round(exit_config.rates.get(b, 0.0), 5))
                  for b in sorted(exits)]
    learned = jr.learned.get(ev.name, [])
    plan = new_plan(
        inputs.model, staged, inputs.spec,
        split=chosen.split, codec=CodecSpec(name=chosen.codec), exits=exit_specs, active_exits=list(chosen.exits),
        weights_source="committed", compression=ev.variant.recipe,
        active_exit_rates={b: round(r, 5) for b, r in exit_config.rates.items()},
        learned_codecs=[CodecSpec(name=lc.codec.name, params=lc.codec.cfg.to_params()) for lc in learned],
        exit_calibration=calibration_spec(cal, jr.system_scores),
        estimates=estimates, operating_points=points, pareto=pareto, objective=_objective_record(joint_opts),
        latency_curves=latency_curves(jr.final, joint_opts),
        notes={
            **_link_notes(opts, ev.edge, ev.server), "epsilon": inputs.epsilon, "delta": inputs.delta,
            "certificate": "end to end: final answers (head variant, exits, codec) vs the full fp32 model",
            "validation_images": n_validation, "validation_agreement": round(1.0 - (final.disagreement or 0.0), 5),
            "chosen_exits": ",".join(str(b) for b in chosen.exits), "head_variant": ev.name,
            "head_variants": ",".join(x.name for x in jr.evals),
            "planning_seconds": round(jr.seconds["total"], 2),
            "weights_test_accuracy": float(info.get("test_accuracy", 0.0)),
            **{f"rejected_{i}": r for i, r in enumerate(jr.rejected)}, **jr.notes,
        },
    )
    _stage_times(plan, ev.edge, ev.server, opts.edge_slowdown)
    codec_states = {lc.boundary: lc.codec.bottleneck.state_for_bundle() for lc in learned}
    limit = cons.max_bundle_bytes
    if limit is not None:
        total = bundle_files_bytes(plan, ev.variant, exits, codec_states)
        if total > limit:
            raise ValueError(f"--max-bundle-bytes {limit}: the chosen plan's bundle holds {total} bytes "
                             f"(weights, exits and codecs {final.bundle_bytes} + plan.json "
                             f"{total - (final.bundle_bytes or 0)}); raise the limit by at least {total - limit}")
    return plan, final, codec_states
