"""``splitinfer edge ...`` / ``python -m edge_agent ...``: parse options, build settings, hand off."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

app = typer.Typer(help="Run the edge agent (head + exits) with its local HTTP API.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def _root() -> None:
    """Edge agent commands."""


@app.command("run")
def run(
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Plan bundle directory (env SPLITINFER_EDGE_BUNDLE)."),
    server: str | None = typer.Option(
        None, "--server", help="Cloud server gRPC address HOST:PORT (env SPLITINFER_EDGE_SERVER)."),
    host: str | None = typer.Option(
        None, "--host", help="HTTP bind address (default 127.0.0.1)."),
    port: int | None = typer.Option(
        None, "--port", help="HTTP port (default 8080)."),
    device: str | None = typer.Option(
        None, "--device", help="Device power profile for energy estimates (default raspberry-pi-4)."),
    timeout_s: float | None = typer.Option(
        None, "--timeout-s", help="Deadline of one offload call in seconds (default 1.0)."),
    recheck_interval_s: float | None = typer.Option(
        None, "--recheck-interval-s", help="Seconds on the device after a server failure (default 5)."),
    log_level: str | None = typer.Option(
        None, "--log-level", help="debug, info, warning or error."),
    config: Path | None = typer.Option(
        None, "--config", help="Optional YAML file with any EdgeSettings field."),
) -> None:
    """Serve the edge agent until SIGTERM (options override SPLITINFER_EDGE_* variables and --config)."""
    from edge_agent.settings import EdgeSettings

    try:
        settings = EdgeSettings.load(config, bundle=bundle, server=server, host=host, port=port,
                                     device=device, timeout_s=timeout_s,
                                     recheck_interval_s=recheck_interval_s, log_level=log_level)
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: invalid edge agent settings: {exc}", err=True)
        raise typer.Exit(2) from None
    from edge_agent.app import serve
    from splitinfer.errors import SplitInferError

    try:
        serve(settings)
    except SplitInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _batch_runtime(bundle: Path | None, server: str | None, config: Path | None):
    from edge_agent.runtime import build_runtime
    from edge_agent.settings import EdgeSettings

    try:
        settings = EdgeSettings.load(config, bundle=bundle, server=server or None)
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: invalid edge agent settings: {exc}", err=True)
        raise typer.Exit(2) from None
    from splitinfer.errors import SplitInferError

    try:
        rt = build_runtime(settings)
    except SplitInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    rt.probe_server()  # offload when the server is up; otherwise answer on the device (degraded)
    return rt, settings


@app.command("classify")
def classify(
    files: list[Path] = typer.Argument(..., help="PNG, JPEG or .npy files"),
    bundle: Path | None = typer.Option(None, "--bundle", help="Plan bundle directory (env SPLITINFER_EDGE_BUNDLE)."),
    server: str | None = typer.Option(None, "--server", help="Cloud server HOST:PORT (env SPLITINFER_EDGE_SERVER)."),
    config: Path | None = typer.Option(None, "--config", help="Optional YAML file with any EdgeSettings field."),
) -> None:
    """Classify files and write one JSON line per file on stdout (exit 1 if any file failed)."""
    import sys

    from edge_agent.sources import classify_files

    rt, settings = _batch_runtime(bundle, server, config)
    try:
        _, failed = classify_files(rt, files, sys.stdout, settings.max_upload_bytes, settings.max_image_pixels)
    finally:
        rt.close()
    if failed:
        raise typer.Exit(1)


@app.command("watch")
def watch_cmd(
    directory: Path = typer.Argument(..., help="directory to watch for new PNG, JPEG or .npy files"),
    out: Path | None = typer.Option(None, "--out", help="append JSON lines here (default: stdout)"),
    interval_s: float = typer.Option(0.5, help="seconds between polls"),
    bundle: Path | None = typer.Option(None, "--bundle", help="Plan bundle directory (env SPLITINFER_EDGE_BUNDLE)."),
    server: str | None = typer.Option(None, "--server", help="Cloud server HOST:PORT (env SPLITINFER_EDGE_SERVER)."),
    config: Path | None = typer.Option(None, "--config", help="Optional YAML file with any EdgeSettings field."),
) -> None:
    """Classify every file that appears in DIRECTORY (once each), as JSON lines, until interrupted."""
    import contextlib
    import sys

    from edge_agent.sources import watch

    if not directory.is_dir():
        typer.echo(f"error: {directory} is not a directory", err=True)
        raise typer.Exit(2)
    rt, settings = _batch_runtime(bundle, server, config)
    sink = open(out, "a") if out else sys.stdout  # noqa: SIM115 - closed below
    try:
        with contextlib.suppress(KeyboardInterrupt):
            for _ in watch(rt, directory, sink, settings.max_upload_bytes, settings.max_image_pixels, interval_s):
                pass
    finally:
        rt.close()
        if out:
            sink.close()
