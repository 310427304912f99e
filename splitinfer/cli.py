"""The ``splitinfer`` command: one sub-command per role, mounted here and nowhere else.

``plan`` (partitioner), ``cloud`` (server), ``edge`` (agent) and ``demo``. Role packages are imported only
when their sub-command runs, so a device with only the edge role installed never imports the planner.
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
    from splitinfer.demo import demo_command

    app.command("demo", help="Run the whole system on the embedded default and print a summary.")(demo_command)
    return app


def main() -> None:
    """Console-script entry point."""
    build_app()()
