"""A real cloud server (``python -m cloud_server serve``) as a separate process on free loopback ports.

Start it with :func:`start_server` (a bundle, the tests' batch limit and grace period) or :func:`spawn_server`
(any arguments and environment, TLS health checks); both return once the gRPC health check says SERVING, and
fail the test with the server's log otherwise. Ports: :func:`free_port` (from :mod:`splitinfer.daemons`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from splitinfer.daemons import Daemon, DaemonError, free_port, grpc_health_status

__all__ = ["MAX_BATCH", "ROOT", "START_TIMEOUT_S", "ServerProcess", "free_port", "grpc_health_status",
           "spawn_server", "start_server"]

ROOT = Path(__file__).resolve().parents[2]
MAX_BATCH = 4  # SPLITINFER_CLOUD_MAX_REQUEST_BATCH of start_server's servers
START_TIMEOUT_S = 90.0


class ServerProcess(Daemon):
    """A cloud server child process listening on ``127.0.0.1:port`` (metrics on ``metrics_port``, 0: none)."""

    def __init__(self, args: Sequence[str], port: int, metrics_port: int, log_path: Path,
                 env: Mapping[str, str], name: str = "cloud server", stop_timeout: float = 30.0) -> None:
        super().__init__(args, name=name, log_path=log_path, env=env, cwd=ROOT, stop_timeout=stop_timeout)
        self.port = port
        self.metrics_port = metrics_port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def spawn_server(port: int, log_path: Path, *, bundle: Path | None = None, metrics_port: int = 0,
                 env: Mapping[str, str] | None = None, unset: Sequence[str] = (), credentials: Any = None,
                 options: Sequence[tuple[str, Any]] = (), name: str = "cloud server", stop_timeout: float = 30.0,
                 timeout: float = START_TIMEOUT_S) -> ServerProcess:
    """``python -m cloud_server serve --port PORT --metrics-port METRICS [--bundle BUNDLE]`` in the repository
    root with this process's environment, ``PYTHONPATH`` and ``env`` (``unset``: variables removed), once its
    health check (over TLS with ``credentials`` and channel ``options``) says SERVING. The log is appended to
    ``log_path``; the test fails with it when the server exits or is not SERVING within ``timeout`` s."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for key in unset:
        full_env.pop(key, None)
    args = [sys.executable, "-m", "cloud_server", "serve", "--port", str(port), "--metrics-port", str(metrics_port)]
    if bundle is not None:
        args += ["--bundle", str(bundle)]
    server = ServerProcess(args, port, metrics_port, log_path, full_env, name, stop_timeout)
    try:
        server.wait_grpc_ready(server.address, timeout=timeout, credentials=credentials, options=options)
    except DaemonError as exc:
        server.kill()
        pytest.fail(f"{exc.headline}:\n{server.log()}")
    return server


def start_server(bundle_dir: Path, port: int, metrics_port: int, log_path: Path) -> ServerProcess:
    """The server for ``bundle_dir`` with at most ``MAX_BATCH`` inputs per request and a 2 s grace period."""
    return spawn_server(port, log_path, bundle=bundle_dir, metrics_port=metrics_port,
                        env={"SPLITINFER_CLOUD_MAX_REQUEST_BATCH": str(MAX_BATCH), "SPLITINFER_CLOUD_GRACE_S": "2"})
