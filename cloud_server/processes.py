"""``--processes N``: N server processes on one port (``SO_REUSEPORT``), one supervisor, one ``/metrics``.

One Python process serves a light tail at most as fast as its one GIL lets it: gRPC's per-call work, the
protocol conversion and the event loop all hold it, so on a 2-core machine one process tops out near 1.2 cores
however many tail threads it has. With ``processes`` > 1 the process started by ``splitinfer cloud serve``
becomes a supervisor:

1. It reserves the gRPC port: a socket bound with ``SO_REUSEPORT`` to ``host:port`` (``port`` 0 picks a free
   one) and held, never listening, for the supervisor's life, so no other program takes the port between the
   workers' binds and the kernel never hands it a connection.
2. It starts ``processes`` worker processes (``python -m cloud_server.processes SPEC``, the settings in a JSON
   file), each a complete server (:class:`~cloud_server.server.CloudServer`: its own event loop, batcher, tail
   threads, health) bound to that port with ``SO_REUSEPORT``. The kernel spreads *connections* over them: a
   client's channel (one HTTP/2 connection) talks to one process; many edge devices spread over all.
3. Metrics: the workers write their samples to files in a private directory (prometheus-client's multiprocess
   mode); the supervisor alone serves ``/metrics`` on ``metrics_port``, summing every worker's counters and
   histograms (gauges: live workers' sum).
4. It logs ``cloud server ready`` (with the port) once every worker is; on SIGTERM/SIGINT it passes the signal
   on, each worker drains as a single server does (``grace_s``), and it exits when they have. If a worker dies
   on its own the supervisor stops the others and exits 1 (a restarting supervisor such as systemd or
   Kubernetes then starts afresh); a worker whose supervisor dies gets SIGTERM from the kernel.

What is per process: ``workers`` and ``torch_threads`` (so the CPUs a worker's tail may use are the usable CPUs
divided by ``processes``; that is the default of ``torch_threads``), ``max_inflight``, the batch queue and
``max_concurrency_per_client`` (a client's connection stays on one process, so its limit still holds). What is
off: loading and unloading models through the repository API (each process has its own copy of the models;
restart the server to change them), answered FAILED_PRECONDITION.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cloud_server.settings import CloudSettings
from splitinfer.errors import ConfigError

log = logging.getLogger("cloud_server")

READY_POLL_S = 0.05
PR_SET_PDEATHSIG = 1


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound with ``SO_REUSEPORT`` to ``host:port`` (0: a free port), not listening: it keeps the port
    for the workers, who bind it with the same option."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve --host {host!r}: {exc}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the gRPC port {host}:{port} (--host / --port): {exc.strerror or exc}; is "
                      "another process listening there?") from exc
    return sock


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Starts, watches and stops the worker processes of one server (see the module docstring)."""

    def __init__(self, settings: CloudSettings):
        if settings.processes < 2:
            raise ConfigError("the supervisor is for processes >= 2")
        self.settings = settings
        self.workdir = Path(tempfile.mkdtemp(prefix="splitinfer-cloud-"))
        self.metrics_dir = self.workdir / "metrics"
        self.metrics_dir.mkdir()
        self.children: list[subprocess.Popen] = []
        self.port: int | None = None
        self._reservation: socket.socket | None = None
        self._endpoint = None
        self._stopping = False

    def start(self, timeout_s: float = 600.0) -> int:
        """Reserve the port, start the workers and wait until every one serves; returns the port."""
        s = self.settings
        self._reservation = reserve_port(s.host, s.port)
        self.port = int(self._reservation.getsockname()[1])
        spec = s.model_dump(mode="json")
        spec.update(port=self.port, metrics_port=0, processes=1)
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir))
        for index in range(s.processes):
            path = self.workdir / f"worker-{index}.json"
            path.write_text(json.dumps({"settings": spec, "index": index, "count": s.processes,
                                        "ready_file": str(self.workdir / f"ready-{index}")}))
            self.children.append(subprocess.Popen([sys.executable, "-m", "cloud_server.processes", str(path)],
                                                  env=env, preexec_fn=_die_with_parent))
        deadline = time.monotonic() + timeout_s
        while not all((self.workdir / f"ready-{i}").exists() for i in range(s.processes)):
            dead = [(i, c.returncode) for i, c in enumerate(self.children) if c.poll() is not None]
            if dead:
                raise OSError(f"worker process {dead[0][0]} exited with code {dead[0][1]} before serving (its "
                              "log above says why)")
            if time.monotonic() > deadline:
                raise OSError(f"the worker processes were not serving after {timeout_s:.0f} s")
            time.sleep(READY_POLL_S)
        if s.metrics_port:
            self._endpoint = serve_multiprocess_metrics(s.host, s.metrics_port, self.metrics_dir)
        log.info("cloud server ready", extra={"fields": {
            "host": s.host, "port": self.port, "processes": s.processes,
            "pids": [c.pid for c in self.children], "tls": s.tls_cert is not None,
            "metrics_port": self._endpoint.port if self._endpoint else None,
            "source": str(s.model_repository or s.bundle), "workers_per_process": s.workers}})
        return self.port

    def signal_children(self, sig: int) -> None:
        """Pass ``sig`` to every worker still running."""
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)

    def wait(self, stop_requested) -> int:
        """Watch the workers until ``stop_requested()`` or one dies; then stop all. Returns the exit code."""
        code = 0
        while not stop_requested():
            dead = [(i, c.returncode) for i, c in enumerate(self.children) if c.poll() is not None]
            if dead:
                log.error("a worker process exited on its own; stopping the others", extra={"fields": {
                    "worker": dead[0][0], "exit_code": dead[0][1]}})
                code = 1
                break
            time.sleep(0.2)
        self.stop()
        return code

    def stop(self) -> None:
        """SIGTERM to every worker (each drains up to ``grace_s``), then SIGKILL to any left; clean up."""
        if self._stopping:
            return
        self._stopping = True
        self.signal_children(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_s + 5.0
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("a worker process did not stop within the grace period; killed",
                          extra={"fields": {"pid": child.pid}})
                child.kill()
                child.wait()
        if self._endpoint is not None:
            self._endpoint.close()
        if self._reservation is not None:
            self._reservation.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        log.info("stopped", extra={"fields": {"processes": len(self.children),
                                              "exit_codes": [c.returncode for c in self.children]}})


def serve_multiprocess_metrics(host: str, port: int, directory: Path):
    """``/metrics`` summing what every worker process wrote to ``directory`` (prometheus-client multiprocess)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from cloud_server.metrics import serve_registry

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    try:
        return serve_registry(registry, host, port)
    except OSError as exc:
        raise OSError(f"cannot bind the metrics endpoint to {host}:{port} (--metrics-port): "
                      f"{exc.strerror or exc}") from exc


def supervise(settings: CloudSettings) -> int:
    """Run ``settings.processes`` worker processes until SIGTERM/SIGINT; returns the exit code."""
    requested: list[int] = []
    supervisor = Supervisor(settings)

    def on_signal(signum, _frame) -> None:
        requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            supervisor.start()
        except (ConfigError, OSError) as exc:
            supervisor.stop()
            log.error("cannot start: %s", exc, extra={"fields": {"error": type(exc).__name__}})
            return 2
        code = supervisor.wait(lambda: bool(requested))
        if requested:
            log.info("signal received, shutting down", extra={"fields": {"processes": settings.processes}})
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker_main(spec_path: str) -> int:
    """One worker process: a :class:`~cloud_server.server.CloudServer` on the shared port until a signal."""
    from cloud_server.server import serve

    spec = json.loads(Path(spec_path).read_text())
    settings = CloudSettings(**spec["settings"])
    return serve(settings, process=(int(spec["index"]), int(spec["count"])), ready_file=Path(spec["ready_file"]))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
