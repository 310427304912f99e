"""``splitinfer cloud`` and ``python -m cloud_server``: parse options, then hand off to the server."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

app = typer.Typer(help="Run the cloud server (the tail) over gRPC.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def _root() -> None:
    """Cloud server commands."""


def _int_list(text: str | None, flag: str) -> list[int] | None:
    """``"18,20"`` -> ``[18, 20]`` (None stays None); a non-integer exits with a usage error naming ``flag``."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        typer.echo(f"error: {flag} takes comma-separated integers, got {text!r}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    bundle: Path | None = typer.Option(None, "--bundle",
                                       help="Plan bundle directory (or env SPLITINFER_CLOUD_BUNDLE)."),
    model_repository: Path | None = typer.Option(
        None, "--model-repository", help="Repository directory ROOT/<model>/<version>/ of bundles, instead of "
                                         "--bundle (or env SPLITINFER_CLOUD_MODEL_REPOSITORY)."),
    host: str | None = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="gRPC port (default 8001; 0 picks a free one)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port",
                                            help="Prometheus /metrics port (default 8002; 0 disables)."),
    max_request_batch: int | None = typer.Option(None, "--max-request-batch",
                                                 help="Largest batch one request may carry (default 64)."),
    max_batch: int | None = typer.Option(None, "--max-batch", hidden=True,
                                         help="Deprecated: the old name of --max-request-batch."),
    batch_max_size: int | None = typer.Option(None, "--batch-max-size",
                                              help="Dynamic batching: most samples per tail run (default 32; "
                                                   "1 turns batching off)."),
    batch_max_delay_ms: float | None = typer.Option(None, "--batch-max-delay-ms",
                                                    help="Dynamic batching: longest wait for a batch to fill "
                                                         "(default 2)."),
    workers: int | None = typer.Option(None, "--workers", help="Batches computed at once (default 2)."),
    processes: int | None = typer.Option(None, "--processes", help="Server processes sharing the port (default 1; "
                                         "more escape one process's GIL: see docs/cloud-server.md)."),
    inline_compute_max_ms: float | None = typer.Option(
        None, "--inline-compute-max-ms", help="When idle, run a lone request whose measured compute is at most "
                                              "this long on the event loop (default 5; 0: never)."),
    torch_threads: int | None = typer.Option(None, "--torch-threads",
                                             help="torch intra-op threads per worker (default: CPUs / workers)."),
    tail_engine: str | None = typer.Option(None, "--tail-engine", help="torch (default), torchscript, onnxruntime "
                                           "or auto (fastest measured at load)."),
    tail_engine_splits: str | None = typer.Option(None, "--tail-engine-splits",
                                                  help="Comma-separated splits to build the tail engine for "
                                                       "(default: the plan's)."),
    decoder_engine: str | None = typer.Option(None, "--decoder-engine", help="Learned codec decoder: auto "
                                              "(default), onnxruntime or torch."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM server certificate (TLS on)."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    tls_client_ca: Path | None = typer.Option(None, "--tls-client-ca",
                                              help="PEM CA of client certificates (mutual TLS)."),
    auth_tokens_file: Path | None = typer.Option(None, "--auth-tokens-file",
                                                 help="Bearer tokens file (TOKEN or NAME:TOKEN per line)."),
    log_level: str | None = typer.Option(None, "--log-level",
                                         help="debug, info, warning, error or critical (any case; default info)."),
) -> None:
    """Serve model tails (Open Inference Protocol v2 over gRPC) until SIGTERM/SIGINT, then drain.

    Every option can also come from the environment (SPLITINFER_CLOUD_<OPTION>); see docs/cloud-server.md."""
    from cloud_server.server import serve as run_server
    from cloud_server.settings import CloudSettings

    if max_batch is not None:
        from splitinfer.settings_common import warn_renamed

        if max_request_batch is None:
            warn_renamed("--max-batch", "--max-request-batch")
            max_request_batch = max_batch
        else:
            warn_renamed("--max-batch", "--max-request-batch", ignored=True)
    overrides = {"bundle": bundle, "model_repository": model_repository, "host": host, "port": port,
                 "metrics_port": metrics_port, "max_request_batch": max_request_batch,
                 "batch_max_size": batch_max_size,
                 "batch_max_delay_ms": batch_max_delay_ms, "workers": workers, "processes": processes,
                 "torch_threads": torch_threads,
                 "inline_compute_max_ms": inline_compute_max_ms, "tail_engine": tail_engine,
                 "tail_engine_splits": _int_list(tail_engine_splits, "--tail-engine-splits"),
                 "decoder_engine": decoder_engine,
                 "tls_cert": tls_cert, "tls_key": tls_key, "tls_client_ca": tls_client_ca,
                 "auth_tokens_file": auth_tokens_file, "log_level": log_level}
    try:
        settings = CloudSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        from splitinfer.settings_errors import describe

        flags = {name: "--" + name.replace("_", "-") for name in overrides}
        for line in describe(exc, "SPLITINFER_CLOUD_", flags):
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_server(settings))


@app.command("export-triton")
def export_triton(
    bundle: Path = typer.Argument(..., help="Plan bundle directory."),
    out: Path = typer.Argument(..., help="Triton model repository to write into (created if needed)."),
    split: int | None = typer.Option(None, "--split",
                                     help="Export stages SPLIT..N-1 (0: the whole model; default: the plan's split)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (onnxruntime_onnx) or torchscript (pytorch_libtorch)."),
    max_batch: int = typer.Option(64, "--max-batch", help="Triton max_batch_size (dynamic batching)."),
    model_name: str | None = typer.Option(None, "--model-name",
                                          help="Model name (default: NAME_tailK; the plan's model name for split 0)."),
    decoder: bool | None = typer.Option(None, "--decoder/--no-decoder",
                                        help="Put the learned bottleneck's decoder in front of the tail (default: "
                                             "when one of the bundle's learned codecs sits at the split)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT/<model name> if it exists."),
    backend: str | None = typer.Option(None, "--backend", help="python: a Triton Python-backend ensemble taking "
                                       "the edge's own request (payload + split/codec parameters) and running our "
                                       "decode + tail (--format, --split, --decoder do not apply)."),
    python_env: Path | None = typer.Option(None, "--python-env", help="--backend python: the virtual environment "
                                           "the models run in (default: this one)."),
    max_delay_us: int = typer.Option(2000, "--max-delay-us", help="--backend python: dynamic batching delay."),
    torch_threads: int = typer.Option(1, "--torch-threads", help="--backend python: torch threads per instance."),
    tail_engine: str = typer.Option("torch", "--tail-engine", help="--backend python: torch, torchscript, "
                                    "onnxruntime or auto (see splitinfer cloud serve)."),
) -> None:
    """Write OUT/<model name>/{config.pbtxt,1/model.onnx|model.pt} so Triton or KServe can run BUNDLE's tail.

    Input: the DECODED boundary tensor, FP32 'features' [-1, *boundary shape] ('input' for split 0). Output: 'logits'.

    Codec decoding stays with the caller: decode the uint8-affine/float32 payload before calling the model.

    At a split where the bundle has a learned codec the model includes that bottleneck's decoder and takes
    entropy-decoded UINT8 'symbols'.

    The written model is run on a batch of 3 and compared with the torch tail before it is moved into place.

    Exit status 2: bad bundle or option; 1: the export or its check failed (nothing is written).
    """
    from cloud_server.export_triton import ExportCheckFailed
    from cloud_server.export_triton import export_triton as run_export
    from splitinfer.errors import SplitInferError

    if backend is not None:
        _export_python(bundle, out, backend, model_name, max_batch, max_delay_us, torch_threads, tail_engine,
                       python_env, force, split, decoder)
        return

    try:
        r = run_export(bundle, out, split=split, fmt=fmt, max_batch=max_batch, model_name=model_name,
                       decoder=decoder, force=force)
    except ExportCheckFailed as exc:
        typer.echo(f"export failed, nothing written: {exc}", err=True)
        raise typer.Exit(1) from None
    except SplitInferError as exc:
        typer.echo(f"cannot export: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"cannot export: {exc}", err=True)
        raise typer.Exit(1) from None
    dims = ", ".join(map(str, r.input_dims))
    typer.echo(f"wrote {r.model_dir}/ (model {r.model_name!r}, {r.platform}): {r.model_dir / 'config.pbtxt'}, "
               f"{r.model_file}")
    what = "decoder + tail" if r.with_decoder else ("whole model" if r.split == 0 else "tail")
    typer.echo(f"{what} from split {r.split} of {r.num_stages}: input {r.input_name!r} {r.input_dtype} [-1, {dims}] "
               f"-> 'logits' TYPE_FP32 [-1, {r.num_classes}]")
    typer.echo(f"check: exported model vs torch tail on a batch of 3: max abs diff {r.max_abs_diff:.3g} "
               f"(tolerance {r.tolerance:.3g}) OK")
    if r.config_parsed is None:
        typer.echo("config.pbtxt not parsed: tritonclient is not installed")
    else:
        typer.echo("config.pbtxt parses as a Triton ModelConfig")
    typer.echo(f"serve: tritonserver --model-repository {out}")


def _export_python(bundle: Path, out: Path, backend: str, model_name: str | None, max_batch: int, max_delay_us: int,
                   torch_threads: int, tail_engine: str, python_env: Path | None, force: bool, split: int | None,
                   decoder: bool | None) -> None:
    from cloud_server.tail_engines import ENGINES
    from cloud_server.triton_python import write_python_repository
    from splitinfer.errors import SplitInferError

    if backend != "python":
        typer.echo(f"error: --backend takes python, not {backend!r} (omit it for --format onnx|torchscript)", err=True)
        raise typer.Exit(2)
    if split is not None or decoder is not None:
        typer.echo("error: --backend python serves every split with the server's own decoding: --split and "
                   "--decoder do not apply", err=True)
        raise typer.Exit(2)
    if tail_engine not in ENGINES:
        typer.echo(f"error: --tail-engine takes {', '.join(ENGINES)}, not {tail_engine!r}", err=True)
        raise typer.Exit(2)
    try:
        repo = write_python_repository(bundle, out, model_name=model_name, max_batch=max_batch,
                                       max_delay_us=max_delay_us, torch_threads=torch_threads,
                                       tail_engine=tail_engine, python_env=python_env, force=force)
    except (SplitInferError, OSError) as exc:
        typer.echo(f"cannot export: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {repo.root}/: ensemble {repo.model_name!r} (what the edge calls) -> {repo.decode_model} "
               f"(payload -> features) -> {repo.tail_model} (tail, dynamic batching); run it with "
               f"'splitinfer cloud triton-serve {repo.root}'")


@app.command("triton-serve")
def triton_serve(
    repository: Path = typer.Argument(..., help="Triton model repository (e.g. from export-triton --backend python)."),
    port: int = typer.Option(8001, "--port", help="gRPC port on 127.0.0.1."),
    env_dir: Path = typer.Option(Path("runs/.venv-triton"), "--env-dir",
                                 help="Virtual environment for nvidia-pytriton (made on first use, ~370 MB)."),
    model: str | None = typer.Option(None, "--model", help="Wait until this model is ready (default: health)."),
) -> None:
    """Run a real Triton Inference Server (2.51, from the nvidia-pytriton wheel, CPU) on REPOSITORY until
    SIGTERM/SIGINT; its log goes to ENV_DIR/tritonserver.log (the path is printed once it is ready)."""
    import signal
    import time

    from cloud_server.triton_python import prepare_triton, start_tritonserver
    from splitinfer.daemons import DaemonError
    from splitinfer.errors import ConfigError

    try:
        install = prepare_triton(env_dir, log=lambda m: typer.echo(m, err=True))
        daemon = start_tritonserver(install, repository, port, Path(env_dir) / "tritonserver.log", model=model)
    except (ConfigError, DaemonError) as exc:
        typer.echo(f"cannot start Triton: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"tritonserver ready on 127.0.0.1:{port} (log {Path(env_dir) / 'tritonserver.log'})", err=True)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop and daemon.poll() is None:
        time.sleep(0.5)
    if daemon.poll() is not None:
        typer.echo(f"tritonserver exited with status {daemon.poll()}", err=True)
        raise typer.Exit(1)
    raise typer.Exit(0 if daemon.stop() in (0, -signal.SIGTERM) else 1)
