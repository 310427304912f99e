"""``splitinfer plan ...``: parse arguments and hand off to the partitioner's library code."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Plan a deployment: train the default model, profile, choose splits, write bundles.",
                  no_args_is_help=True)



def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A typer callback that refuses numbers outside [lo, hi] (open ends with ``lo_open``/``hi_open``): the
    error names the flag, exits 2, and comes before any work (None passes: the option was not given)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    wanted = " and ".join(parts)

    def check(value):
        if value is None:
            return value
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
              (hi is not None and (value >= hi if hi_open else value > hi))
        if bad or value != value:  # NaN is never in range
            raise typer.BadParameter(f"must be {wanted}, got {value:g}")
        return value

    return check


POSITIVE = _range(0, lo_open=True)
NON_NEGATIVE = _range(0)
AT_LEAST_ONE = _range(1)
PROBABILITY = _range(0, 1, lo_open=True, hi_open=True)


def _parsed_by(parser_name: str):
    """A typer callback that checks a text option with ``partitioner.cost.<parser_name>`` (the value stays
    text); its ValueError becomes the flag's error."""

    def check(text: str) -> str:
        from partitioner import cost

        try:
            getattr(cost, parser_name)(text)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        return text

    return check


def _one_of(*choices: str):
    """A typer callback that accepts only ``choices`` (checked before any work, the flag named)."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


SCORES = _one_of("max_softmax", "margin", "neg_entropy")
CALIBRATION_MODES = _one_of("certified", "empirical")
# The exit-calibration options, the same for `plan make` and `plan calibrate-exits`.
Epsilon = Annotated[float, typer.Option(callback=PROBABILITY, help="max rate at which the exits' answers may "
                                                                   "disagree with the full model's")]
Delta = Annotated[float, typer.Option(callback=PROBABILITY, help="the bound holds with probability at least "
                                                                 "1 - delta (certified mode)")]
Score = Annotated[str, typer.Option(callback=SCORES, help="exit confidence: max_softmax, margin or neg_entropy")]
Mode = Annotated[str, typer.Option(callback=CALIBRATION_MODES,
                                   help="'certified' (finite-sample guarantee) or 'empirical' (none)")]
_bandwidth = _parsed_by("parse_bandwidth")
_duration = _parsed_by("parse_duration")


def _out_dir(path: Path) -> Path:
    """A directory that can be written: refuse an existing file (or a file on the way) before any work."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise typer.BadParameter(f"{p} exists and is not a directory", param_hint="'--out'")
    return path


@app.command("train-embedded")
@app.command("train-default", help="Same as train-embedded (the default model unless --model names another).")
def train_default_cmd(
    model: str = typer.Option("default", help="embedded model to train: default (28x28 CNN), "
                                              "mobilenet_v2_fmnist (torchvision MobileNetV2 at 64x64) or "
                                              "vit_fmnist (a small vision transformer at 28x28)"),
    epochs: int = typer.Option(None, callback=AT_LEAST_ONE,
                               help="training epochs for the backbone (default: the committed weights' epochs)"),
    seed: int = typer.Option(20261122, help="random seed (data order, augmentation, initialisation)"),
    exits: str = typer.Option(None, help="comma-separated boundaries that get exit heads (default: the model's)"),
    exit_epochs: int = typer.Option(3, callback=AT_LEAST_ONE,
                                    help="distillation epochs for the exit heads (backbone frozen)"),
    threads: int = typer.Option(2, callback=AT_LEAST_ONE, help="torch threads"),
    out_dir: Path = typer.Option(None, help="where to write the weights (default: the packaged splitinfer/weights)"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
    train_limit: int = typer.Option(None, callback=AT_LEAST_ONE,
                                    help="use only the first N training images (quick runs)"),
    test_limit: int = typer.Option(None, callback=AT_LEAST_ONE,
                                   help="evaluate on only the first N test images (quick runs)"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Train an embedded model and its exit heads on Fashion-MNIST (rendered at the model's input size); write
    safetensors weights with the command and figures beside them."""
    from partitioner.train import TrainConfig, model_input, split_train_validation, train_embedded
    from partitioner.weights import save_default, weights_dir
    from splitinfer.data import load_fashion_mnist
    from splitinfer.exits import train_exits
    from splitinfer.models import embedded_model
    from splitinfer.staged import stage_model

    try:
        spec = embedded_model(model)
    except ValueError as exc:
        raise _fail(exc) from None
    exits = exits or ",".join(map(str, spec.exits))
    cfg = TrainConfig.for_model(model, epochs=epochs or None, seed=seed, threads=threads, train_limit=train_limit,
                                test_limit=test_limit)
    start = time.perf_counter()
    net, report = train_embedded(model, cfg, data_dir, progress=progress)
    typer.echo(f"backbone: test accuracy {report['test_accuracy']:.4f}, validation {report['validation_accuracy']:.4f}")
    boundaries = [int(b) for b in exits.split(",") if b.strip()]
    staged = stage_model(net, spec.example())
    train = load_fashion_mnist("train", data_dir)
    tr_idx, _ = split_train_validation(len(train), seed)
    if train_limit:
        tr_idx = tr_idx[:train_limit]
    x_tr = model_input(train.images[tr_idx], spec.size)
    heads = train_exits(staged, boundaries, x_tr, num_classes=10, epochs=exit_epochs, seed=seed, progress=progress)
    report["exit_epochs"] = exit_epochs
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["command"] = (f"splitinfer plan train-embedded --model {model} --epochs {cfg.epochs} --seed {seed} "
                         f"--exits {exits} --exit-epochs {exit_epochs} --threads {threads}")
    target = out_dir or weights_dir()
    save_default(Path(target), net, heads, report, name=model)
    typer.echo(f"wrote weights to {target} in {report['total_seconds']:.0f} s")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} must be comma-separated integers") from exc


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


@app.command("profile")
def profile_cmd(
    model: str = typer.Option("default", help="an embedded model (default, mobilenet_v2_fmnist, vit_fmnist), "
                                              "any torchvision classification model by name (`plan models`) or "
                                              "package.module:function"),
    out: Path = typer.Option(None, help="write the profile JSON here"),
    threads: int = typer.Option(1, callback=AT_LEAST_ONE,
                                help="torch threads (1 for an edge profile; the server's worker threads)"),
    batch_sizes: str = typer.Option("1", help="comma-separated batch sizes to time (a server: e.g. 1,2,4,8,16)"),
    repeats: int = typer.Option(30, callback=AT_LEAST_ONE,
                                help="timed runs at batch 1 after warm-up (p5/p50/p95/mean are recorded; the "
                                     "planner uses the mean); larger batches use fewer"),
    checkpoint: Path = typer.Option(None, help="safetensors state dict for a torchvision or user model"),
    input_shape: str = typer.Option(None, help="C,H,W (required for a user model; torchvision: its published "
                                                     "size, see `plan models`)"),
    codec: str = typer.Option("uint8-affine", help="codec timed at every boundary"),
    compressed: Path = typer.Option(None, help="profile the compressed model `plan compress` wrote here"),
    as_json: bool = typer.Option(False, "--json", help="print the profile as JSON on stdout"),
    progress: bool = typer.Option(True, help="show a progress bar (on stderr)"),
) -> None:
    """Measure a model on this machine: per-stage latency distributions (and per batch size), per-boundary
    bytes and codec times, MACs and parameters per stage, the head's peak memory; machine and threads."""
    from partitioner.profile import profile_model, save_profile
    from partitioner.target import load_target
    from splitinfer.codec import get_codec
    from splitinfer.errors import SplitInferError

    try:
        target = load_target(model, checkpoint, _ints(input_shape) if input_shape else None, compressed=compressed)
        if target.weights_warning():
            typer.echo(target.weights_warning(), err=True)
        prof = profile_model(target.staged, target.exits, get_codec(codec), target.example(), repeats=repeats,
                             threads=threads, batch_sizes=tuple(_ints(batch_sizes)), model_name=target.name,
                             progress=progress)
    except (ValueError, SplitInferError) as exc:
        raise _fail(exc) from exc
    if out is not None:
        save_profile(prof, out)
    if as_json:
        typer.echo(json.dumps(prof.to_dict(), indent=1))
    else:
        name = f"{target.name} ({target.weights_note})" if compressed else target.name
        typer.echo(f"{name}: {prof.num_stages} stages, {prof.total_params:,} parameters, "
                   f"{prof.total_macs / 1e9:.3f} GMACs, {sum(prof.stage_ms):.2f} ms at batch 1 "
                   f"({threads} thread(s), {prof.machine})" + (f"; wrote {out}" if out else ""))


@app.command("models")
def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="print the list as JSON on stdout"),
) -> None:
    """List the models `--model` accepts by name: the embedded ones (trained here) and every torchvision
    classification model, with the input size, parameters and GMACs torchvision publishes for it."""
    from splitinfer.models import EMBEDDED_MODELS, torchvision_model, torchvision_names

    rows = [{"name": name, "kind": "embedded", "input_shape": [1, spec.size, spec.size], "weights": "committed"}
            for name, spec in EMBEDDED_MODELS.items()]
    for name in torchvision_names():
        tv = torchvision_model(name)
        rows.append({"name": name, "kind": "torchvision", "input_shape": list(tv.input_shape),
                     "num_params": tv.num_params, "gmacs": tv.gmacs, "weights": "random unless --checkpoint",
                     "published_weights": tv.weights})
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        extra = (f"{r['num_params'] / 1e6:8.1f} M params {r['gmacs']:8.3f} GMACs" if r["kind"] == "torchvision"
                 else "trained here on Fashion-MNIST")
        typer.echo(f"{r['name']:22s} {r['kind']:11s} {','.join(map(str, r['input_shape'])):>11s}  {extra}")
    if not torchvision_names():
        typer.echo("(torchvision is not installed: pip install 'splitinfer[vision]' for its models)", err=True)


@app.command("probe")
def probe_cmd(
    server: str = typer.Option(..., help="cloud server gRPC address HOST:PORT"),
    target_ms: float = typer.Option(200.0, callback=POSITIVE,
                                    help="grow the probe message until its transfer takes this long"),
    max_bytes: int = typer.Option(8 << 20, callback=_range(64 * 1024),
                                  help="largest probe message (bytes; messages grow from 64 KiB by x4)"),
    as_json: bool = typer.Option(False, "--json", help="print the measurement as JSON"),
) -> None:
    """Measure RTT, throughput and per-message overhead to a running cloud server with real gRPC calls."""
    from partitioner.probe import probe

    try:
        res = probe(server, target_s=target_ms / 1e3, max_bytes=max_bytes)
    except (ConnectionError, ValueError) as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=1))
        return
    bw = "n/a" if res.bandwidth_bps is None else f"{res.bandwidth_bps / 1e6:.3f} Mbit/s"
    typer.echo(f"{server}: RTT {res.rtt_ms:.2f} ms (median of {len(res.rtt_ms_samples)}), throughput {bw} "
               f"(messages of {res.sizes[0]:,} to {res.sizes[-1]:,} B), request overhead "
               f"{res.request_overhead_bytes} B")
    typer.echo(f"plan with: splitinfer plan make {res.make_flags()} ...")


def _read_images(folder: Path | None) -> tuple[bytes, ...]:
    """The PNG/JPEG files in ``folder`` (sorted by name); ValueError if there is none."""
    if folder is None:
        return ()
    if not folder.is_dir():
        raise ValueError(f"--input-images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())
    if not files:
        raise ValueError(f"--input-images {folder} holds no .png/.jpg/.jpeg file")
    return tuple(p.read_bytes() for p in files)


def _bottleneck_source(value: str, model: str, staged=None):
    """``--bottlenecks``: None for the committed ones, [] for none, or the bottlenecks a directory holds."""
    if value == "committed":
        return None
    if value == "none":
        return []
    folder = Path(value)
    if not folder.is_dir():
        raise ValueError(f"--bottlenecks must be committed, auto, none or a directory written by `plan "
                         f"train-bottleneck`; {value!r} is none of these")
    from partitioner.codec import load_bottlenecks

    found = load_bottlenecks(folder, model, staged=staged)
    if not found:
        raise ValueError(f"--bottlenecks {folder} holds no bottleneck of model {model}")
    return [bn for bn, _ in found.values()]


@app.command("make")
def make_cmd(
    out: Path = typer.Option(..., callback=_out_dir, help="bundle directory to write"),
    model: str = typer.Option("default", help="an embedded model (default, mobilenet_v2_fmnist, vit_fmnist), "
                                              "a torchvision name or package.module:function"),
    bandwidth: str = typer.Option("5mbit", callback=_bandwidth,
                                  help="uplink bandwidth in bits per second: 5mbit, 500kbit, 1.5gbit or a bare "
                                       "number of bit/s (byte units are refused)"),
    rtt: str = typer.Option("20ms", callback=_duration, help="round-trip time: 20ms, 0.02s, 500us (bare: ms)"),
    loss: float = typer.Option(0.0, callback=_range(0, 1, hi_open=True),
                               help="per-packet loss probability of the link (each loss costs ~one RTO)"),
    overhead: int = typer.Option(None, callback=NON_NEGATIVE,
                                 help="per-request protocol overhead in bytes (`plan probe` measures it)"),
    device: str = typer.Option(None, help="edge device profile (energy, and its compute slowdown estimate)"),
    edge_slowdown: float = typer.Option(None, callback=POSITIVE,
                                        help="edge compute time = the edge profile's x F (overrides --device's; a "
                                             "quick estimate for a device you are not on)"),
    edge_profile: Path = typer.Option(None, help="profile JSON measured on the edge device (default: measure here)"),
    server_profile: Path = typer.Option(None, help="profile JSON measured on the server (default: measure here)"),
    agent_overhead_ms: float = typer.Option(None, callback=NON_NEGATIVE,
                                            help="the edge agent's own per-request work in ms (its /v1/status "
                                                 "reports agent_overhead_ms)"),
    server_load: float = typer.Option(0.0, callback=NON_NEGATIVE,
                                      help="offloaded requests/s the server receives from all clients (M/D/1 "
                                           "queueing)"),
    objective: str = typer.Option("latency", help="latency, energy, bytes, privacy or weighted"),
    weights: str = typer.Option(None, help="for --objective weighted: e.g. latency=1,energy=0.5,bytes=0.1,"
                                           "privacy=1"),
    max_accuracy_drop: float = typer.Option(None, callback=NON_NEGATIVE,
                                            help="constraint: max estimated accuracy drop (points)"),
    max_edge_memory: int = typer.Option(None, callback=AT_LEAST_ONE,
                                        help="constraint: max edge memory (bytes: head weights + activations; with "
                                             "--head-variants also measured on the written bundle)"),
    max_bytes: int = typer.Option(None, callback=NON_NEGATIVE,
                                  help="constraint: max payload bytes per offloaded request"),
    max_bundle_bytes: int = typer.Option(None, callback=AT_LEAST_ONE,
                                         help="constraint: max bytes of the bundle's files (an over-the-air update); "
                                              "with --head-variants"),
    max_leakage: float = typer.Option(None, callback=_range(0, 1),
                                      help="constraint: max SSIM of a white-box reconstruction of the input from an "
                                           "offloaded request's payload (leakage table: --leakage or the model's "
                                           "committed one; docs/privacy.md)"),
    leakage: Path = typer.Option(None, help="leakage table JSON written by `plan privacy` (default: the embedded "
                                            "model's committed one, when --max-leakage or the privacy objective "
                                            "needs it)"),
    head_variants: str = typer.Option(None, help="plan jointly over head variants: 'all' (fp32 + every committed "
                                                 "compressed variant), or names / `plan compress` directories, "
                                                 "comma-separated; the certificate then covers the final answers "
                                                 "end to end (embedded models)"),
    splits: str = typer.Option("all", help="'all' (0..N, incl. cloud-only and edge-only) or 'interior' (1..N-1)"),
    checkpoint: Path = typer.Option(None, help="safetensors weights of a torchvision or user model"),
    input_shape: str = typer.Option(None, help="C,H,W of a user model (torchvision: its published size, "
                                                     "see `plan models`)"),
    input_images: Path = typer.Option(None, help="folder of sample inputs as users send them (PNG/JPEG files): "
                                                 "cloud-only may then forward the file (codec 'image') instead "
                                                 "of a uint8 tensor; the default model makes PNGs itself"),
    epsilon: Epsilon = 0.01,
    delta: Delta = 0.05,
    score: Score = "max_softmax",
    calibration_mode: Mode = "certified",
    repeats: int = typer.Option(30, callback=AT_LEAST_ONE,
                                help="timed runs per stage after warm-up (the cost model uses their mean)"),
    learned_codec: bool = typer.Option(True, help="consider learned bottleneck codecs (--no-learned-codec: none)"),
    bottlenecks: str = typer.Option("committed", help="learned codecs to consider: 'committed' (an embedded "
                                                      "model's own), 'auto' (train them here at the most "
                                                      "promising boundaries within --bottleneck-budget), or a "
                                                      "directory written by `plan train-bottleneck`"),
    bottleneck_budget: float = typer.Option(600.0, callback=POSITIVE,
                                            help="seconds --bottlenecks auto may spend training"),
    bottleneck_count: int = typer.Option(3, callback=AT_LEAST_ONE,
                                         help="at most this many boundaries for --bottlenecks auto"),
    max_codec_drop: float = typer.Option(1.0, callback=NON_NEGATIVE,
                                         help="accept the learned codec only if its validation accuracy drop is at "
                                              "most this many points"),
    compressed: Path = typer.Option(None, help="plan the compressed model `plan compress` wrote in this directory "
                                               "(embedded models)"),
    head: str = typer.Option("fp32", callback=_one_of("fp32", "int8", "auto"),
                             help="edge head: fp32, int8 (post-training quantized), or auto (int8 when faster here "
                                  "and within --max-head-drop)"),
    max_head_drop: float = typer.Option(0.5, callback=NON_NEGATIVE,
                                        help="max validation accuracy drop (points) of an int8 head for auto"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
    progress: bool = typer.Option(True, help="show progress bars (on stderr)"),
    as_json: bool = typer.Option(False, "--json", help="print the estimates as JSON instead of a table"),
) -> None:
    """Profile (or read profiles), estimate every (split, codec, exits) configuration, choose one under the
    objective and constraints, tabulate operating points over bandwidth x RTT, and write the bundle."""
    from partitioner.auto_bottleneck import AutoBottlenecks
    from partitioner.cost import PROTOCOL_OVERHEAD_BYTES, Link, parse_bandwidth, parse_duration
    from partitioner.make import PlanOptions, make_default_plan, make_model_plan
    from partitioner.profile import load_profile
    from partitioner.report import split_table
    from partitioner.search import Constraints, Objective
    from partitioner.target import load_target
    from splitinfer.energy import DEFAULT_DEVICE, get_profile
    from splitinfer.errors import SplitInferError
    from splitinfer.models import EMBEDDED_MODELS

    try:
        link = Link(parse_bandwidth(bandwidth), parse_duration(rtt), loss=loss,
                    request_overhead=PROTOCOL_OVERHEAD_BYTES if overhead is None else overhead)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--bandwidth' / '--rtt' / '--loss'") from exc
    try:
        obj = Objective.parse(objective, weights)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--objective' / '--weights'") from exc
    if splits not in ("all", "interior"):
        raise typer.BadParameter(f"must be 'all' or 'interior', got {splits!r}", param_hint="'--splits'")
    try:
        dev = get_profile(device) if device else None
        if dev is None and (obj.kind == "energy" or "energy" in dict(obj.weights)):
            dev = get_profile(DEFAULT_DEVICE)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--device'") from exc
    try:
        cons = Constraints(max_accuracy_drop, max_edge_memory, max_bytes, max_bundle_bytes,
                           max_leakage=max_leakage)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    table = None
    if max_leakage is not None or obj.uses_privacy or leakage is not None:
        from partitioner.privacy import leakage_table_for

        try:
            table = leakage_table_for(model, leakage)
        except (ValueError, SplitInferError) as exc:
            raise _fail(exc) from exc
    slowdown = edge_slowdown if edge_slowdown is not None else (dev.compute_slowdown if dev and not edge_profile
                                                                else 1.0)
    try:
        eprof = load_profile(edge_profile) if edge_profile else None
        if agent_overhead_ms is not None:
            if agent_overhead_ms < 0:
                raise ValueError("--agent-overhead-ms must not be negative")
            if eprof is None:
                raise ValueError("--agent-overhead-ms applies to an edge profile: give --edge-profile")
            eprof.request_overhead_ms = agent_overhead_ms
        sprof = load_profile(server_profile) if server_profile else None
        auto = None
        if learned_codec and bottlenecks == "auto":
            auto = AutoBottlenecks(budget_s=bottleneck_budget, count=bottleneck_count,
                                   echo=lambda line: typer.echo(line, err=True))
        if model in EMBEDDED_MODELS:
            if checkpoint is not None:
                raise ValueError(f"{model} is an embedded model with committed weights: --checkpoint does not apply")
            result = make_default_plan(out, link, dev, slowdown, splits, epsilon, delta, repeats, data_dir,
                                       score=score, calibration_mode=calibration_mode, learned_codec=learned_codec,
                                       max_codec_drop=max_codec_drop, head=head, max_head_drop=max_head_drop,
                                       objective=obj, constraints=cons, server_load_rps=server_load,
                                       edge_profile=eprof, server_profile=sprof, progress=progress,
                                       input_images=_read_images(input_images), model=model,
                                       bottlenecks=_bottleneck_source(bottlenecks, model) if auto is None else None,
                                       auto_bottlenecks=auto, compressed=compressed, head_variants=head_variants,
                                       leakage=table)
        else:
            if compressed is not None:
                raise ValueError("--compressed applies to embedded models (plan compress writes them)")
            if head_variants is not None or max_bundle_bytes is not None:
                raise ValueError("--head-variants and --max-bundle-bytes apply to embedded models (their variants are "
                                 "compressed and measured on their data)")
            if head != "fp32":
                raise ValueError("--head int8/auto needs calibration data: only the default model supports it")
            target = load_target(model, checkpoint, _ints(input_shape) if input_shape else None)
            if target.weights_warning():
                typer.echo(target.weights_warning(), err=True)
            opts = PlanOptions(link=link, device=dev, edge_slowdown=slowdown, splits=splits, objective=obj,
                               constraints=cons, server_load_rps=server_load, repeats=repeats, progress=progress,
                               input_images=_read_images(input_images), leakage=table)
            chosen_bns = None if auto is not None or not learned_codec else \
                _bottleneck_source(bottlenecks, model, target.staged)
            result = make_model_plan(out, target, opts, eprof, sprof, bottlenecks=chosen_bns or [],
                                     max_codec_drop=max_codec_drop, auto_bottlenecks=auto, data_dir=data_dir)
    except (ValueError, SplitInferError) as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps({"split": result.chosen.split, "codec": result.chosen.codec,
                               "exits": result.chosen.exits, "bundle": str(result.path),
                               "chosen": result.chosen.model_dump(),
                               "estimates": [e.model_dump() for e in result.estimates],
                               "pareto": [e.model_dump() for e in result.pareto or []]}, indent=2))
    else:
        typer.echo(split_table(result))


@app.command("compress")
def compress_cmd(
    out: Path = typer.Option(..., help="directory for the compressed model (then: plan make --compressed DIR)"),
    method: str = typer.Option(..., help="deep (prune + k-means sharing + entropy coding), lowrank (Tucker-2/SVD, "
                                         "one rank rule for all layers), auto (per-layer ranks chosen by "
                                         "sensitivity), ternary, binary, mixed (per-layer bit widths chosen by "
                                         "sensitivity), uniform-bits, prune (stage-internal channels)"),
    model: str = typer.Option("default", help="embedded model to compress"),
    budget: float = typer.Option(None, help="lowrank/auto: fraction of the model's MACs kept (default 0.5); "
                                            "mixed: mean bits per weight (default 4); prune: fraction of each "
                                            "stage-internal convolution's channels removed (default 0.5)"),
    sparsity: float = typer.Option(0.7, callback=_range(0, 1, hi_open=True),
                                   help="deep: fraction of each layer's weights pruned"),
    bits: int = typer.Option(4, help="deep: bits per cluster index; uniform-bits: weight bits"),
    epochs: float = typer.Option(2.0, callback=POSITIVE, help="distillation fine-tuning epochs (may be fractional)"),
    train_limit: int = typer.Option(None, callback=AT_LEAST_ONE, help="use only the first N training images"),
    val_images: int = typer.Option(2000, callback=AT_LEAST_ONE,
                                   help="validation images for the auto/mixed policies' sensitivity measurements"),
    pow2: bool = typer.Option(False, help="uniform/mixed bits: power-of-two scales (dynamic fixed point)"),
    seed: int = typer.Option(0, help="random seed"),
    threads: int = typer.Option(None, callback=AT_LEAST_ONE, help="torch threads"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
) -> None:
    """Compress an embedded model (see docs/compression.md) and write it with its recipe and test figures."""
    from partitioner.compress import compress_embedded
    from splitinfer.compression.methods import METHODS, Options
    from splitinfer.errors import SplitInferError
    from splitinfer.models import EMBEDDED_MODELS

    if method not in METHODS:
        raise typer.BadParameter(f"choose one of {', '.join(METHODS)}, not {method!r}", param_hint="'--method'")
    if model not in EMBEDDED_MODELS:
        raise typer.BadParameter(f"plan compress needs training data: choose an embedded model "
                                 f"({', '.join(EMBEDDED_MODELS)}), not {model!r}", param_hint="'--model'")
    if not 1 <= bits <= 8:
        raise typer.BadParameter(f"must be 1..8, got {bits}", param_hint="'--bits'")
    try:
        info = compress_embedded(model, method, out, Options(epochs=epochs, budget=budget, sparsity=sparsity,
                                                              bits=bits, seed=seed, pow2=pow2),
                                 train_limit, data_dir, threads, val_images)
    except (ValueError, SplitInferError) as exc:
        raise _fail(exc) from exc
    f = info["figures"]
    typer.echo(f"{method}: test accuracy {f['test_accuracy']:.4f} (fp32 {f['test_accuracy_fp32']:.4f}, drop "
               f"{f['drop_points']:.2f} points); stored {f['stored_bytes']:,} B ({f['storage_ratio']:.1f}x below "
               f"fp32 safetensors); MACs {f['macs']:,} ({f['mac_reduction']:.0%} fewer); wrote {out}")


@app.command("calibrate-exits")
def calibrate_exits_cmd(
    bundle: Path = typer.Option(..., help="bundle directory whose exit thresholds are (re)calibrated in place"),
    epsilon: Epsilon = 0.01,
    delta: Delta = 0.05,
    score: Score = "max_softmax",
    mode: Mode = "certified",
    limit: int = typer.Option(None, callback=AT_LEAST_ONE, help="use only the first N calibration images"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
) -> None:
    """Choose exit thresholds with a distribution-free guarantee on the disagreement with the full model.

    Calibration images: the validation split carved from the Fashion-MNIST training set (never the test set).
    """
    from partitioner.calibrate import recalibrate_bundle
    from splitinfer.errors import SplitInferError

    try:
        cal = recalibrate_bundle(bundle, epsilon, delta, score, mode, limit, data_dir)
    except (ValueError, SplitInferError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{cal.mode} calibration ({cal.score}): epsilon {cal.epsilon}, delta {cal.delta}, "
               f"{cal.n_path} path + {cal.n_test} test samples")
    for b, t, r in zip(cal.boundaries, cal.thresholds, cal.exit_rates, strict=True):
        typer.echo(f"  exit at boundary {b}: threshold {t:.4f}, exit rate {r:.1%}")
    bound = "" if cal.upper_bound is None else f", {1 - cal.delta:.0%} upper bound {cal.upper_bound:.4f}"
    typer.echo(f"disagreement on the test part {cal.empirical_disagreement:.4f}{bound}; mean MACs "
               f"{cal.mean_macs / cal.full_macs:.1%} of the full model")
    for note in cal.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"updated {bundle / 'plan.json'}")


_DEFAULT_MODEL_BOUNDARY = 6  # partitioner.codec.DEFAULT_BOUNDARY: where the committed default bottleneck sits


def _choice_of_ints(*choices: int):
    """A typer callback that accepts only ``choices`` (None passes: the option was not given)."""

    def check(value: int | None) -> int | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"must be one of {', '.join(map(str, choices))}, got {value}")
        return value

    return check


def _shape(dims) -> str:
    return "x".join(str(int(d)) for d in dims)


def _command_line(prefix: str, options: list[tuple[str, object]]) -> str:
    """``prefix`` followed by every option that has a value (shell-quoted)."""
    import shlex

    parts = [prefix]
    for flag, value in options:
        if value is not None:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


@app.command("train-bottleneck")
def train_bottleneck_cmd(
    model: str = typer.Option("default", help="an embedded model (default, mobilenet_v2_fmnist), a torchvision "
                                              "name (resnet18, mobilenet_v2, ...) or package.module:function"),
    checkpoint: Path = typer.Option(None, help="safetensors state dict for a torchvision or user model (without "
                                               "it a torchvision model has random weights: no accuracy)"),
    input_shape: str = typer.Option(None, help="C,H,W (required for a user model; torchvision: its published "
                                                     "size, see `plan models`)"),
    images: Path = typer.Option(None, help="train on an image folder (DIR/<class>/<image>) instead of "
                                           "Fashion-MNIST; a seeded 20 % is held out as the test set"),
    boundary: str = typer.Option(None, help="boundary, or comma-separated boundaries, to train a bottleneck at "
                                            f"(default: {_DEFAULT_MODEL_BOUNDARY} for the default model; "
                                            "required for the others)"),
    channels: int = typer.Option(None, callback=AT_LEAST_ONE,
                                 help="latent channels (default: the size rule, BottleneckConfig.for_boundary)"),
    bits: int = typer.Option(3, callback=_range(1, 8), help="quantization bits per latent value (1-8)"),
    hidden: int = typer.Option(None, callback=AT_LEAST_ONE,
                               help="hidden channels of encoder and decoder (default: the size rule)"),
    stride: int = typer.Option(None, callback=_choice_of_ints(1, 2, 4),
                               help="spatial downsampling of the latent (tokens: that many merged into one): "
                                    "1, 2 or 4 (default: the size rule)"),
    coder: str = typer.Option("ans", callback=_one_of("ans", "zstd", "raw"), help="entropy coder: ans, zstd or raw"),
    epochs_float: int = typer.Option(1, callback=NON_NEGATIVE, help="distillation epochs without rounding"),
    epochs_qat: int = typer.Option(3, callback=NON_NEGATIVE,
                                   help="quantization-aware distillation epochs (straight-through rounding)"),
    train_limit: int = typer.Option(20000, callback=NON_NEGATIVE,
                                    help="training images (the first N of the training split; 0: all)"),
    test_limit: int = typer.Option(None, callback=AT_LEAST_ONE, help="evaluate on only the first N test images"),
    max_tail_cost: float = typer.Option(50.0, callback=NON_NEGATIVE,
                                        help="when a training step through the tail after a boundary costs more "
                                             "than this many million MAC-equivalents per sample (MACs + 256 per "
                                             "activation), match features at a nearer boundary (cheaper steps, "
                                             "no logits term) if that costs at most half; a huge value always "
                                             "distils through the whole tail"),
    budget_s: float = typer.Option(None, callback=POSITIVE,
                                   help="stop after this many seconds in all (each boundary gets an equal share of "
                                        "what is left; its epochs are shortened to fit)"),
    seed: int = typer.Option(0, help="random seed"),
    threads: int = typer.Option(2, callback=AT_LEAST_ONE, help="torch threads"),
    privacy: str = typer.Option("none", callback=_one_of("none", "adversarial"),
                                help="privacy defence trained with the codec: none, or adversarial (the encoder "
                                     "also maximises an inversion decoder's error; see docs/privacy.md)"),
    privacy_weight: float = typer.Option(1.0, callback=NON_NEGATIVE,
                                         help="weight of the adversarial term against the distillation loss"),
    out_dir: Path = typer.Option(None, help="where to write <stem>_bottleneck_<B>.safetensors/.json (default for "
                                            "embedded models: the packaged splitinfer/weights; required otherwise)"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Train learned bottleneck codecs for any model at one or more boundaries by distillation from the frozen
    model (no labels), evaluate each on test images, and write one safetensors + JSON pair per boundary."""
    from partitioner.codec import (
        describe_eval,
        fashion_mnist_inputs,
        image_folder_inputs,
        load_teacher,
        save_bottleneck,
        train_bottlenecks,
    )
    from partitioner.weights import weights_dir
    from splitinfer.bottleneck import DistillConfig, agreement_note, check_boundaries
    from splitinfer.errors import SplitInferError

    try:
        shape = _ints(input_shape) if input_shape else None
        teacher = load_teacher(model, checkpoint, shape)
        wanted = _ints(boundary) if boundary else ([_DEFAULT_MODEL_BOUNDARY] if model == "default" else [])
        check_boundaries(teacher.staged, wanted, model)
        if out_dir is None and not teacher.embedded:
            raise ValueError(f"--out-dir is required for {model} (only embedded models have a packaged "
                             "weights directory)")
        target = Path(out_dir) if out_dir is not None else weights_dir()
        if target.exists() and not target.is_dir():
            raise ValueError(f"--out-dir {target} exists and is not a directory")
        if images is not None:
            folder = image_folder_inputs(images, teacher.input_spec, seed=seed, train_limit=train_limit or None,
                                         test_limit=test_limit)
            x_tr, x_te, y_te, data_note = folder.x_train, folder.x_test, folder.y_test, folder.note
        else:
            x_tr, _ = fashion_mnist_inputs("train", teacher.input_spec, seed=teacher.seed,
                                           limit=train_limit or None, data_dir=data_dir)
            x_te, y_te = fashion_mnist_inputs("test", teacher.input_spec, seed=teacher.seed, limit=test_limit,
                                              data_dir=data_dir)
            c, h, w = teacher.input_spec.shape
            data_note = (f"Fashion-MNIST: {len(x_tr)} training images (validation split of seed {teacher.seed} "
                         f"excluded) and {len(x_te)} test images, rendered at {h}x{w}, grey"
                         + (" replicated to 3 channels" if c == 3 else ""))
    except (ValueError, SplitInferError) as exc:
        raise _fail(exc) from exc
    note = agreement_note(teacher.weights, model)
    if note:
        typer.echo(f"note: {note}", err=True)
    dcfg = DistillConfig(epochs_float=epochs_float, epochs_qat=epochs_qat, seed=seed, threads=threads,
                         max_tail_cost=int(max_tail_cost * 1e6), privacy=privacy, privacy_weight=privacy_weight)
    options = [("--model", model), ("--checkpoint", checkpoint), ("--input-shape", input_shape),
               ("--images", images), ("--boundary", ",".join(map(str, wanted))), ("--channels", channels),
               ("--bits", bits), ("--hidden", hidden), ("--stride", stride), ("--coder", coder),
               ("--epochs-float", epochs_float), ("--epochs-qat", epochs_qat), ("--train-limit", train_limit),
               ("--test-limit", test_limit), ("--max-tail-cost", f"{max_tail_cost:g}"), ("--budget-s", budget_s),
               ("--seed", seed), ("--threads", threads)]
    if privacy != "none":
        options += [("--privacy", privacy), ("--privacy-weight", f"{privacy_weight:g}")]
    command = _command_line("splitinfer plan train-bottleneck", options)

    def provenance(report: dict) -> dict:
        cfg = report["config"]
        one = [(k, v) for k, v in options if k not in ("--boundary", "--channels", "--hidden", "--stride")]
        one[4:4] = [("--boundary", cfg["boundary"]), ("--channels", cfg["channels"]), ("--hidden", cfg["hidden"]),
                    ("--stride", cfg["stride"])]
        return {**report, "model": model, "input_shape": list(teacher.input_spec.shape),
                "teacher_weights": teacher.weights, "teacher_sha256": teacher.weights_sha256, "data": data_note,
                "seed": seed, "command": command, "reproduce": _command_line("splitinfer plan train-bottleneck", one)}

    def done(bn, report: dict) -> None:
        path = save_bottleneck(target, bn, provenance(report), teacher.stem)
        stopped = " (time budget: epochs cut short)" if report.get("stopped_early") or \
            report.get("steps_per_epoch") else ""
        typer.echo(f"bottleneck at boundary {report['boundary']} ({_shape(bn.cfg.in_shape)} -> "
                   f"{_shape(bn.cfg.latent_shape)}, {bn.cfg.bits} bits): {describe_eval(report)}; "
                   f"{report['seconds']:.0f} s{stopped}; wrote {path}")

    try:
        results = train_bottlenecks(teacher.staged, wanted, x_tr, x_te, y_te, bits=bits, coder=coder,
                                    channels=channels, hidden=hidden, stride=stride, dcfg=dcfg, budget_s=budget_s,
                                    teacher_weights=teacher.weights, model=model, progress=progress,
                                    on_result=done, echo=lambda line: typer.echo(f"note: {line}", err=True))
    except (ValueError, SplitInferError) as exc:
        raise _fail(exc) from exc
    if results and "not_trained" in results[-1][1].get("budget", {}):
        save_bottleneck(target, results[-1][0], provenance(results[-1][1]), teacher.stem)  # record the stop


@app.command("codec-sweep")
def codec_sweep_cmd(
    out: Path = typer.Option(..., help="JSON file to write"),
    boundaries: str = typer.Option("6", help="comma-separated boundaries"),
    channels: str = typer.Option("4,8", help="comma-separated latent channel counts"),
    bits: str = typer.Option("2,3,4", help="comma-separated bit widths"),
    epochs_float: int = typer.Option(1, callback=NON_NEGATIVE,
                                     help="distillation epochs without rounding, per trained bottleneck"),
    epochs_qat: int = typer.Option(1, callback=NON_NEGATIVE,
                                   help="quantization-aware epochs, per (boundary, channels, bits)"),
    train_limit: int = typer.Option(20000, callback=AT_LEAST_ONE, help="training images per bottleneck"),
    test_limit: int = typer.Option(None, callback=AT_LEAST_ONE, help="test images to evaluate on"),
    threads: int = typer.Option(2, callback=AT_LEAST_ONE, help="torch threads"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
    progress: bool = typer.Option(False, help="show progress bars"),
) -> None:
    """Rate-accuracy sweep over boundary x channels x bits: bytes per sample vs accuracy and agreement.

    Every point also lists uint8-affine at the same boundary. `splitinfer plan report` plots the result.
    """
    from partitioner.sweep import run_sweep

    def ints(text: str) -> list[int]:
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers") from exc

    try:
        result = run_sweep(ints(boundaries), ints(channels), ints(bits), epochs_float, epochs_qat, train_limit,
                           test_limit, threads, data_dir, progress, echo=typer.echo)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(f"wrote {len(result['points'])} points to {out}")


@app.command("privacy")
def privacy_cmd(
    out: Path = typer.Option(..., help="leakage table JSON to write (plan make --leakage reads it)"),
    model: str = typer.Option("default", help="an embedded model (default, mobilenet_v2_fmnist)"),
    boundaries: str = typer.Option("1,4,6,9,11,13,14",
                                   help="comma-separated boundaries whose uint8-affine payload is attacked"),
    train_images: int = typer.Option(20000, callback=AT_LEAST_ONE, help="the attacker's training images"),
    test_images: int = typer.Option(2000, callback=AT_LEAST_ONE, help="test images reconstructed and scored"),
    epochs: int = typer.Option(3, callback=AT_LEAST_ONE, help="epochs of each inversion decoder"),
    png: Path = typer.Option(None, help="also write a grid of inputs and their reconstructions"),
    threads: int = typer.Option(2, callback=AT_LEAST_ONE, help="torch threads"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
) -> None:
    """Measure what each split's payload reveals: a white-box inversion decoder per boundary (uint8-affine) and
    per committed learned codec, trained on the training images and scored on the test set (SSIM, PSNR), plus
    the image file sent at split 0. Writes the leakage table `plan make --max-leakage` uses (docs/privacy.md)."""
    import torch

    from partitioner.codec import load_bottlenecks
    from partitioner.privacy import AttackConfig, embedded_victim, measure_leakage, reconstruction_grid
    from partitioner.weights import weights_dir
    from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from splitinfer.errors import SplitInferError
    from splitinfer.models import EMBEDDED_MODELS
    from splitinfer.plan import InputSpec

    try:
        if model not in EMBEDDED_MODELS:
            raise ValueError(f"plan privacy measures embedded models (trained here, with their data): "
                             f"{', '.join(EMBEDDED_MODELS)}; {model!r} is not one")
        wanted = _ints(boundaries)
        cfg = AttackConfig(train_images=train_images, test_images=test_images, epochs=epochs)
        torch.set_num_threads(threads)
        v, _, pixels = embedded_victim(model, cfg, data_dir)
        n = v.staged.num_stages
        bad = [b for b in wanted if not 0 < b < n]
        if bad:
            raise ValueError(f"boundaries {bad} are not interior boundaries of {model} (1..{n - 1})")
        size = EMBEDDED_MODELS[model].size
        spec = InputSpec(shape=[1, size, size], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
                         labels=FASHION_MNIST_CLASSES)
        bns = [bn for bn, _ in load_bottlenecks(weights_dir(), model, staged=v.staged).values()]
        table, recs = measure_leakage(model, v, wanted, cfg, spec, pixels, bns,
                                      log=lambda m: typer.echo(m, err=True))
    except (ValueError, SplitInferError) as exc:
        raise _fail(exc) from exc
    table.attack["command"] = _command_line("splitinfer plan privacy", [
        ("--model", model), ("--boundaries", boundaries), ("--train-images", train_images),
        ("--test-images", test_images), ("--epochs", epochs), ("--out", out)])
    table.save(out)
    if png is not None:
        reconstruction_grid(png, v.img_test, recs, title=f"white-box inversions of {model}'s payloads")
    for e in sorted(table.entries, key=lambda e: (e.boundary, e.codec)):
        typer.echo(f"boundary {e.boundary:>3} {e.codec:<13} SSIM {e.ssim:.3f}  PSNR {e.psnr or 0:.1f} dB  "
                   f"{e.bytes_mean or 0:.0f} B")
    typer.echo(f"wrote {out}" + (f" and {png}" if png is not None else ""))


@app.command("samples")
def samples_cmd(
    out: Path = typer.Argument(..., callback=_out_dir, help="folder to write the images into"),
    count: int = typer.Option(20, callback=_range(1, 10000), help="how many test images"),
    start: int = typer.Option(0, callback=_range(0, 9999), help="index of the first test image"),
    fmt: str = typer.Option("png", "--format", callback=_one_of("png", "jpeg"), help="png or jpeg"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
) -> None:
    """Write Fashion-MNIST test images as files (INDEX_CLASS.png) to try the edge agent with."""
    from splitinfer.data import save_test_images
    from splitinfer.errors import SplitInferError

    try:
        paths = save_test_images(out, count, fmt, data_dir, start)
    except (ValueError, SplitInferError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {len(paths)} images to {out} ({paths[0].name} ... {paths[-1].name})")


def compressed_variants(directory: Path) -> list[dict]:
    """Figures of the compressed models in ``directory`` (itself, or its subdirectories, each holding
    compression.json), with the fp32 model first: the points of ``plan report``'s compression plot."""
    from splitinfer.compression.artifact import INFO_FILE

    paths = [directory] if (directory / INFO_FILE).is_file() else sorted(
        p for p in directory.iterdir() if p.is_dir() and (p / INFO_FILE).is_file())
    out: list[dict] = []
    for p in paths:
        try:
            info = json.loads((p / INFO_FILE).read_text())
            f = info["figures"]
            if not out:
                out.append({"name": "fp32", "test_accuracy": f["test_accuracy_fp32"], "stored_bytes": f["fp32_bytes"],
                            "storage_ratio": 1.0, "mac_reduction": 0.0, "latency_ms": f.get("fp32_latency_ms")})
            out.append({"name": f"{info['method']} ({p.name})", **f})
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            typer.echo(f"skipping {p}: unreadable compression.json ({exc})", err=True)
    return out


@app.command("report")
def report_cmd(
    directory: Path = typer.Argument(..., help="a bundle directory, and/or a folder holding codec_sweep.json or "
                                               "compressed models (plan compress --out)"),
    out: Path = typer.Option(None, help="where to write the PNGs (default: DIRECTORY)"),
) -> None:
    """Print a bundle's operating points and Pareto set and write PNG plots: latency vs split at several
    bandwidths, bytes per boundary, the operating-point map over bandwidth x RTT, rate vs accuracy of a
    codec sweep (``codec_sweep.json`` in DIRECTORY, from ``splitinfer plan codec-sweep``), and accuracy vs stored
    bytes and vs latency of compressed models (DIRECTORY or its subdirectories, from ``splitinfer plan compress``)."""
    from partitioner.plots import (
        bytes_per_boundary_plot,
        latency_vs_split_plot,
        leakage_plot,
        leakage_points_of_plan,
        operating_point_map,
        rate_accuracy_plot,
    )
    from splitinfer.bundle import PLAN_FILE, read_plan
    from splitinfer.errors import BundleError

    out = out or directory
    out.mkdir(parents=True, exist_ok=True)
    wrote = []
    if (directory / PLAN_FILE).is_file():
        try:
            plan = read_plan(directory)
        except BundleError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        from partitioner.report import accuracy_measured, accuracy_reason

        if plan.model.random_weights:
            typer.echo(f"WARNING: {plan.model.name} has random weights: its answers are meaningless (timing only)")
        typer.echo(f"{'bandwidth':>10} {'RTT ms':>7} {'split':>5} {'codec':>12} {'E[lat] ms':>9} "
                   f"{'E[bytes]':>9}  exits")
        for p in plan.operating_points:
            typer.echo(f"{p.bandwidth_bps / 1e6:>7g} Mb {p.rtt_ms:>7g} {p.split:>5} {p.codec:>12} "
                       f"{p.expected_latency_ms:>9.2f} {p.expected_bytes:>9.1f}  {p.exits}")
        joint = "head_variants" in plan.notes
        if joint:
            typer.echo(f"joint plan over head variants {plan.notes['head_variants']}: chosen "
                       f"{plan.notes['head_variant']}; best configuration per split (at the planned link):")
            for e in sorted(plan.estimates, key=lambda e: (e.split, e.codec)):
                bound = "not judged" if e.disagreement_bound is None else f"bound {e.disagreement_bound:.4f}"
                typer.echo(f"  split {e.split:>3} {e.codec:>12} head {e.head:<14} exits {str(e.exits):<14} "
                           f"{e.expected_latency_ms:9.2f} ms  {bound}")
        if plan.pareto:
            typer.echo(f"Pareto set at the planned link ({plan.objective.get('objective', 'latency')} objective"
                       + ("; configurations judged end to end" if joint else "") + "):")
            measured = accuracy_measured(plan)
            for e in plan.pareto:
                energy = "" if e.expected_energy_j is None else f" {e.expected_energy_j * 1e3:8.2f} mJ"
                drop = f"drop {e.accuracy_drop_points or 0:.2f}" if measured else "drop not measured"
                leak = "" if e.leakage_ssim is None else f"  leakage SSIM {e.leakage_ssim:.3f}"
                typer.echo(f"  split {e.split:>3} {e.codec:>12} exits {str(e.exits):<14} "
                           f"{e.expected_latency_ms:9.2f} ms{energy} {e.expected_bytes or 0:9.1f} B {drop}"
                           + (f"  head {e.head}" if joint else "") + leak)
            if not measured:
                typer.echo(f"accuracy not measured ({accuracy_reason(plan)})")
        wrote.append(bytes_per_boundary_plot(plan, out / "bytes_per_boundary.png"))
        if plan.latency_curves:
            wrote.append(latency_vs_split_plot(plan, out / "latency_vs_split.png"))
        if plan.operating_points:
            wrote.append(operating_point_map(plan, out / "operating_points.png"))
        leaks = leakage_points_of_plan(plan)
        if leaks:
            wrote.append(leakage_plot(leaks, f"leakage vs split and bytes ({plan.model.name}, best configuration "
                                             "per split)", out / "leakage.png"))
    leakage_path = directory / "leakage.json"
    if leakage_path.is_file():
        from partitioner.privacy import LeakageTable

        try:
            table = LeakageTable.load(leakage_path)
        except BundleError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        pts = [(e.boundary, e.codec, e.ssim, e.bytes_mean or 0.0) for e in table.entries if e.bytes_mean]
        typer.echo(f"leakage table of {table.model}: " + ", ".join(f"{e.codec}@{e.boundary} SSIM {e.ssim:.3f}"
                                                                  for e in table.entries))
        wrote.append(leakage_plot(pts, f"leakage vs boundary and bytes ({table.model}, leakage table)",
                                  out / "leakage_table.png"))
    sweep_path = directory / "codec_sweep.json"
    if sweep_path.is_file():
        wrote.append(rate_accuracy_plot(json.loads(sweep_path.read_text()), out / "rate_accuracy.png"))
    variants = compressed_variants(directory)
    if variants:
        from partitioner.plots import compression_plot

        typer.echo(f"{'variant':<28} {'accuracy':>8} {'stored B':>10} {'x fp32':>7} {'MACs -%':>7} {'latency ms':>10}")
        for v in variants:
            typer.echo(f"{v['name']:<28} {v['test_accuracy']:>8.4f} {v['stored_bytes']:>10,} "
                       f"{v['storage_ratio']:>7.2f} {100 * v['mac_reduction']:>7.1f} "
                       f"{'-' if v.get('latency_ms') is None else format(v['latency_ms'], '.3f'):>10}")
        wrote.append(compression_plot(variants, out / "compression.png"))
    if not wrote:
        typer.echo(f"error: {directory} holds neither plan.json, codec_sweep.json, leakage.json nor compressed "
                   "models (compression.json)", err=True)
        raise typer.Exit(2)
    for p in wrote:
        typer.echo(f"wrote {p}")
