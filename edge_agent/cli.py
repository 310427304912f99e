"""``splitinfer edge ...`` / ``python -m edge_agent ...``: parse options, build settings, hand off."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

app = typer.Typer(help="Run the edge agent (head + exits) with its local HTTP API.", no_args_is_help=True,
                  add_completion=False)


# CLI flags of EdgeSettings fields: validation errors name the flag the user typed.
FLAGS = {"bundle": "--bundle", "server": "--server", "host": "--host", "port": "--port", "device": "--device",
         "timeout_s": "--timeout-s", "recheck_interval_s": "--recheck-interval-s", "log_level": "--log-level"}


@app.callback()
def _root() -> None:
    """Edge agent commands."""


def _settings(config: Path | None, **overrides):
    """EdgeSettings from options, environment and config file; exit 2 with flag-named errors when invalid."""
    from edge_agent.settings import ENV_PREFIX, EdgeSettings
    from splitinfer.settings_errors import describe

    try:
        return EdgeSettings.load(config, **overrides)
    except ValidationError as exc:
        lines = describe(exc, ENV_PREFIX, FLAGS)
    except ValueError as exc:
        lines = [str(exc)]
    for line in lines:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


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
        None, "--log-level", help="debug, info, warning, error or critical (any case; default info)."),
    config: Path | None = typer.Option(
        None, "--config", help="Optional YAML file with any EdgeSettings field."),
) -> None:
    """Serve the edge agent until SIGTERM (options override SPLITINFER_EDGE_* variables and --config)."""
    settings = _settings(config, bundle=bundle, server=server, host=host, port=port, device=device,
                         timeout_s=timeout_s, recheck_interval_s=recheck_interval_s, log_level=log_level)
    from edge_agent.app import serve
    from splitinfer.errors import SplitInferError

    try:
        serve(settings)
    except SplitInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _batch_runtime(bundle: Path | None, server: str | None, config: Path | None, allow_degraded: bool):
    """The runtime for a one-shot command, once the server answers ready (or, with ``allow_degraded``, not)."""
    from edge_agent.runtime import build_runtime
    from splitinfer.errors import SplitInferError

    settings = _settings(config, bundle=bundle, server=server or None)
    try:
        rt = build_runtime(settings)
    except SplitInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    up = rt.offloader.check(quiet=True)  # "answering on the device, retry in ..." is said below instead
    if rt.split >= rt.num_stages:  # an edge-only plan never calls the server: nothing to refuse or warn about
        return rt, settings
    if not up:  # offload when the server is up; else answer on the device, or refuse
        reason = rt.status()["server"]["last_error"]
        if not allow_degraded:
            rt.close()
            typer.echo(f"error: cloud server not reachable: {reason}\n(--allow-degraded answers on the device "
                       "instead, from the deepest exit, marked \"degraded\")", err=True)
            raise typer.Exit(1)
        typer.echo(f"warning: cloud server not reachable ({reason}); answering on the device, marked "
                   "\"degraded\"", err=True)
    return rt, settings


@app.command("classify")
def classify(
    files: list[Path] = typer.Argument(..., help="PNG, JPEG or .npy files"),
    bundle: Path | None = typer.Option(None, "--bundle", help="Plan bundle directory (env SPLITINFER_EDGE_BUNDLE)."),
    server: str | None = typer.Option(None, "--server", help="Cloud server HOST:PORT (env SPLITINFER_EDGE_SERVER)."),
    config: Path | None = typer.Option(None, "--config", help="Optional YAML file with any EdgeSettings field."),
    allow_degraded: bool = typer.Option(False, "--allow-degraded",
                                        help="If the server is unreachable, answer on the device (degraded) "
                                             "instead of failing."),
) -> None:
    """Classify files and write one JSON line per file on stdout (exit 1 if any file failed or the server is
    unreachable without --allow-degraded)."""
    import sys

    from edge_agent.sources import classify_files

    rt, settings = _batch_runtime(bundle, server, config, allow_degraded)
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
    exit_when_idle: float | None = typer.Option(
        None, "--exit-when-idle", help="exit once no new file has arrived for this many seconds (default: run "
                                       "until Ctrl-C)"),
    bundle: Path | None = typer.Option(None, "--bundle", help="Plan bundle directory (env SPLITINFER_EDGE_BUNDLE)."),
    server: str | None = typer.Option(None, "--server", help="Cloud server HOST:PORT (env SPLITINFER_EDGE_SERVER)."),
    config: Path | None = typer.Option(None, "--config", help="Optional YAML file with any EdgeSettings field."),
    allow_degraded: bool = typer.Option(False, "--allow-degraded",
                                        help="Start even if the server is unreachable (answer on the device, "
                                             "degraded, until it is back)."),
) -> None:
    """Classify every file that appears in DIRECTORY (once each), as JSON lines, until interrupted. Later
    server outages are answered on the device (degraded) until the server is back."""
    import contextlib
    import sys
    import time

    from edge_agent.sources import watch

    if not directory.is_dir():
        typer.echo(f"error: {directory} is not a directory", err=True)
        raise typer.Exit(2)
    if interval_s <= 0:
        typer.echo("error: --interval-s must be positive", err=True)
        raise typer.Exit(2)
    if exit_when_idle is not None and exit_when_idle <= 0:
        typer.echo("error: --exit-when-idle must be positive", err=True)
        raise typer.Exit(2)
    rt, settings = _batch_runtime(bundle, server, config, allow_degraded)
    sink = open(out, "a") if out else sys.stdout  # noqa: SIM115 - closed below
    try:
        with contextlib.suppress(KeyboardInterrupt):
            last_total, last_change = 0, time.monotonic()
            for total in watch(rt, directory, sink, settings.max_upload_bytes, settings.max_image_pixels,
                               interval_s):
                if total != last_total:
                    last_total, last_change = total, time.monotonic()
                elif exit_when_idle is not None and time.monotonic() - last_change >= exit_when_idle:
                    break
    finally:
        rt.close()
        if out:
            sink.close()
