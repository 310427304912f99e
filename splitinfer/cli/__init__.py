"""The ``splitinfer`` command: one sub-command per role, mounted here and nowhere else.

``plan`` (partitioner), ``cloud`` (server), ``edge`` (agent) and ``demo``. Role packages are imported only
when their sub-command runs, so a device with only the edge role installed never imports the planner.

This package is the composition root: the only part of ``splitinfer`` that knows the roles (``demo.py`` plans
with the partitioner and starts both daemons). The rest of the core imports no role.
"""

from __future__ import annotations

import importlib

import typer

ROLES = {
    "plan": ("partitioner.cli", "Plan a deployment: train the default model, profile, choose splits, write bundles."),
    "cloud": ("cloud_server.cli", "Run the cloud server (the tail) over gRPC."),
    "edge": ("edge_agent.cli", "Run the edge agent (head + exits) with its HTTP API."),
}


def build_app() -> typer.Typer:
    """Assemble the root app, mounting each role's Typer app that can be imported."""
    app = typer.Typer(help="splitinfer: split computing for DNNs.", no_args_is_help=True, add_completion=False)
    for name, (module, help_text) in ROLES.items():
        try:
            sub = importlib.import_module(module).app
        except ImportError as exc:
            sub = typer.Typer(help=f"{help_text} (unavailable: {exc})")
        app.add_typer(sub, name=name, help=help_text)
    from splitinfer.cli.demo import demo_command

    app.command("demo", help="Run the whole system on the embedded default and print a summary.")(demo_command)
    return app


EXTRAS_HINT = ("pip install 'splitinfer[all]', or the extra of the role you run: 'splitinfer[edge]' (the agent with "
               "an ONNX head), '[cloud]', '[plan]'")


def main() -> None:
    """Console-script entry point. A command whose role is not installed (e.g. ``plan`` where only the edge
    extra is) says which package is missing instead of a traceback."""
    try:
        build_app()()
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("splitinfer", "partitioner", "edge_agent", "cloud_server"):
            raise
        typer.echo(f"error: this command needs the Python package {exc.name!r}, which this install lacks "
                   f"({EXTRAS_HINT})", err=True)
        raise SystemExit(2) from None
