"""Start a daemon as a child process and wait until it answers: the one helper for ``splitinfer demo``, the
benchmarks and the tests.

* :func:`free_port`: a TCP port that is free on ``host`` right now.
* :class:`Daemon`: a child process (argv, environment, working directory, log file, optionally its own process
  group) with ``wait_grpc_ready`` (gRPC health SERVING, or ``ModelReady`` for one model),
  ``wait_http_ready`` (a URL answers 200) and ``wait_tcp_ready`` (something listens). Each wait fails fast,
  with the tail of the log, when the process exits first, and after ``timeout`` seconds otherwise.
  ``stop`` sends SIGTERM, waits, then kills.
* :func:`grpc_health_status`, :func:`grpc_model_ready`, :func:`http_ok`, :func:`tcp_open`: one check each;
  :func:`wait_until` polls any check against any liveness test (``tests/e2e/wait_ready.py`` waits for a
  process it did not start).

Torch-free: gRPC and httpx are imported when a check needs them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

POLL_INTERVAL_S = 0.2
CHECK_TIMEOUT_S = 1.0
SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING
LOG_TAIL_CHARS = 4000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` now (the kernel's pick; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ checks


def _channel(address: str, credentials: Any = None, options: Sequence[tuple[str, Any]] = ()):
    import grpc

    # A channel of its own (no subchannel shared with other channels to the address): a check right after the
    # daemon starts listening connects at once instead of waiting out a reconnect backoff.
    opts = [("grpc.use_local_subchannel_pool", 1), *options]
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=opts)
    return grpc.insecure_channel(address, options=opts)


def grpc_health_status(address: str, service: str = "", credentials: Any = None,
                       options: Sequence[tuple[str, Any]] = (), timeout: float = CHECK_TIMEOUT_S) -> int | None:
    """The ``grpc.health.v1`` status of ``service`` at ``address`` (1 = SERVING), None when the call fails.

    ``credentials``: ``grpc.ChannelCredentials`` for TLS; ``options``: extra channel options.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(address, credentials, options) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return None


def grpc_model_ready(address: str, model: str, credentials: Any = None, options: Sequence[tuple[str, Any]] = (),
                     timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Whether the OIP v2 ``ModelReady`` call for ``model`` at ``address`` answers ready."""
    import grpc

    from splitinfer.protocol import grpc_service_pb2 as pb
    from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc

    with _channel(address, credentials, options) as channel:
        try:
            return bool(pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(
                pb.ModelReadyRequest(name=model), timeout=timeout).ready)
        except grpc.RpcError:
            return False


def http_ok(url: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Whether a GET of ``url`` answers 200."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def tcp_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], alive: Callable[[], bool] = lambda: True, timeout: float = 120.0,
               interval: float = POLL_INTERVAL_S) -> Literal["ready", "exited", "timeout"]:
    """Poll ``ready`` every ``interval`` s until it is true (``"ready"``), ``alive`` turns false first
    (``"exited"``), or ``timeout`` s pass (``"timeout"``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return "exited"
        if ready():
            return "ready"
        time.sleep(interval)
    return "timeout"


# ------------------------------------------------------------------------------------------------ daemon


class DaemonError(RuntimeError):
    """A daemon exited before it was ready, or was not ready in time. ``headline`` is the one-line message,
    ``log_tail`` the end of its log; ``str()`` gives both."""

    def __init__(self, headline: str, log_tail: str = "") -> None:
        self.headline = headline
        self.log_tail = log_tail
        super().__init__(f"{headline}:\n{log_tail}" if log_tail else headline)


class Daemon:
    """A child process: ``args`` run in ``cwd`` with ``env`` (default: this process's), stdout and stderr
    appended to ``log_path`` (``append=False`` truncates it first; None: this process's own streams).

    ``new_session``: the child leads a process group of its own and :meth:`stop` signals the whole group (a
    server that starts workers of its own). ``name`` appears in error messages. ``stop_timeout``: how long
    :meth:`stop` waits after its signal before it kills.
    """

    def __init__(self, args: Sequence[str], *, name: str = "daemon", log_path: Path | str | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None, new_session: bool = False,
                 append: bool = True, stop_timeout: float = 30.0) -> None:
        self.args = [str(a) for a in args]
        self.name = name
        self.stop_timeout = stop_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.new_session = new_session
        if self.log_path is None:
            self.proc = subprocess.Popen(self.args, cwd=cwd, env=None if env is None else dict(env),
                                         start_new_session=new_session)
            return
        with open(self.log_path, "ab" if append else "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.args, cwd=cwd, env=None if env is None else dict(env), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=new_session)

    # -- state

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        """The exit code, or None while the process runs."""
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """The whole log so far ("" without a log file)."""
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, n: int = LOG_TAIL_CHARS) -> str:
        """The last ``n`` characters of the log."""
        return self.log()[-n:]

    # -- waiting

    def wait_ready(self, ready: Callable[[], bool], before: str, not_ready: str, timeout: float = 120.0,
                   interval: float = POLL_INTERVAL_S) -> None:
        """Poll ``ready`` until it is true. Raises :class:`DaemonError` ``"<name> exited with code C before
        <before>"`` when the process exits first, ``"<not_ready> within T s"`` after ``timeout`` (the process
        is left running: the caller decides)."""
        outcome = wait_until(ready, self.alive, timeout, interval)
        if outcome == "exited":
            raise DaemonError(f"{self.name} exited with code {self.proc.returncode} before {before}", self.log_tail())
        if outcome == "timeout":
            raise DaemonError(f"{not_ready} within {timeout:.0f} s", self.log_tail())

    def wait_grpc_ready(self, address: str, model: str | None = None, timeout: float = 120.0, service: str = "",
                        credentials: Any = None, options: Sequence[tuple[str, Any]] = ()) -> None:
        """Until the gRPC health check of ``service`` at ``address`` says SERVING, or, with ``model``, until
        ``ModelReady(model)`` answers ready."""
        if model is None:
            self.wait_ready(lambda: grpc_health_status(address, service, credentials, options) == SERVING,
                            "it was healthy", f"{self.name} at {address} did not become healthy", timeout)
        else:
            self.wait_ready(lambda: grpc_model_ready(address, model, credentials, options),
                            f"model {model!r} was ready",
                            f"{self.name} at {address} did not have model {model!r} ready", timeout)

    def wait_http_ready(self, url: str, timeout: float = 120.0) -> None:
        """Until a GET of ``url`` answers 200."""
        self.wait_ready(lambda: http_ok(url), f"{url} answered", f"{url} did not become ready", timeout)

    def wait_tcp_ready(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        """Until something accepts TCP connections on ``host:port``."""
        self.wait_ready(lambda: tcp_open(port, host), f"port {port} opened",
                        f"{self.name}: port {port} did not open", timeout, interval=0.1)

    # -- stopping

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.new_session:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process (to its group with ``new_session``)."""
        if self.proc.poll() is None:
            self._signal(sig)

    def kill(self) -> int:
        """SIGKILL now; returns the exit code."""
        return self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send ``sig`` (SIGTERM: a graceful stop), wait up to ``timeout`` s (default ``stop_timeout``), then
        SIGKILL. Returns the exit code (also when the process had already exited)."""
        timeout = self.stop_timeout if timeout is None else timeout
        if self.proc.poll() is None:
            self._signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if self.new_session:  # workers left behind by a group leader that exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Daemon({self.name!r}, pid={self.proc.pid}, returncode={self.proc.returncode})"
