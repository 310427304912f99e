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


@app.command()
def serve(
    bundle: Path | None = typer.Option(None, "--bundle",
                                       help="Plan bundle directory (or env SPLITINFER_CLOUD_BUNDLE)."),
    host: str | None = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="gRPC port (default 8001; 0 picks a free one)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port",
                                            help="Prometheus /metrics port (default 8002; 0 disables)."),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Largest batch per request (default 64)."),
    log_level: str | None = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Serve the tail of BUNDLE's model (Open Inference Protocol v2 over gRPC) until SIGTERM/SIGINT."""
    from cloud_server.server import serve as run_server
    from cloud_server.settings import CloudSettings

    overrides = {"bundle": bundle, "host": host, "port": port, "metrics_port": metrics_port,
                 "max_batch": max_batch, "log_level": log_level.upper() if log_level else None}
    try:
        settings = CloudSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_server(settings))
