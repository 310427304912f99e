"""The cloud server process: grpc.aio server, TLS, health, reflection, metrics endpoint, signals, logging.

:func:`serve` is what ``splitinfer cloud serve`` hands off to. With ``tls_cert``/``tls_key`` only a TLS port
is opened (plaintext clients fail the handshake); ``tls_client_ca`` adds mutual TLS. On SIGTERM or SIGINT the
server marks itself NOT_SERVING (health and ServerReady), refuses new inference with UNAVAILABLE, ends open
streams once their pending requests are answered, waits up to ``grace_s`` for every accepted request to be
answered, and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud_server.auth import Authenticator, ClientLimiter, load_tokens
from cloud_server.dataplane import BatchPolicy, DataPlane, EngineSettings, served_model_factory
from cloud_server.metrics import MetricsEndpoint, ServerMetrics
from cloud_server.repository import ModelRepository
from cloud_server.servicer import InferenceServicer
from cloud_server.settings import CloudSettings
from splitinfer.allocator import tune_allocator
from splitinfer.errors import BundleError, ConfigError
from splitinfer.gc_freeze import freeze_loaded
from splitinfer.omp_teams import default_threads, oversubscribed, usable_cpus
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("cloud_server")
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str) -> None:
    """Structured (JSON lines) logging on stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {path} is not PEM")
    return data


def server_credentials(settings: CloudSettings) -> grpc.ServerCredentials | None:
    """TLS (and, with ``tls_client_ca``, mutual TLS) credentials from settings; None for plaintext."""
    if settings.tls_cert is None:
        return None
    cert = _read_pem(settings.tls_cert, "TLS certificate")
    key = _read_pem(settings.tls_key, "TLS private key")
    client_ca = _read_pem(settings.tls_client_ca, "client CA bundle") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class CloudServer:
    """A configured, not yet started server; ``await start()``, then ``await stop()``."""

    def __init__(self, settings: CloudSettings, process: tuple[int, int] | None = None):
        """``process`` = (index, count) makes this one of ``count`` worker processes sharing the port
        (:mod:`cloud_server.processes`): bound with ``SO_REUSEPORT``, model control off, CPUs shared."""
        if settings.bundle is None and settings.model_repository is None:
            raise BundleError("no model given: pass --bundle DIR or --model-repository DIR (or set "
                              "SPLITINFER_CLOUD_BUNDLE / SPLITINFER_CLOUD_MODEL_REPOSITORY)")
        self.settings = settings
        self.process = process
        processes = process[1] if process else 1
        self.torch_threads = settings.torch_threads or default_threads(settings.workers * processes)
        torch.set_num_threads(self.torch_threads)
        if oversubscribed(settings.workers * processes, self.torch_threads):
            log.warning("workers x torch_threads exceeds the CPUs: OpenMP then stops spin-waiting between ops and "
                        "every op pays a thread wake-up (the tail runs ~1.5x slower); lower one of them",
                        extra={"fields": {"workers": settings.workers, "torch_threads": self.torch_threads,
                                          "cpus": usable_cpus()}})
        # a lone short job runs on the event loop only single-threaded: a multi-threaded op there would give the
        # loop's thread an OpenMP team of its own beside the workers' (splitinfer/omp_teams.py)
        inline_max_ms = settings.inline_compute_max_ms if self.torch_threads == 1 else 0.0
        self.credentials = server_credentials(settings)
        tokens = load_tokens(settings.auth_tokens_file) if settings.auth_tokens_file else None
        self.auth = Authenticator(tokens)
        self.metrics = ServerMetrics()
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="tail")
        policy = BatchPolicy(max_batch_size=settings.batch_max_size, max_delay_s=settings.batch_max_delay_ms / 1e3,
                             max_queue=settings.batch_max_queue, workers=settings.workers,
                             inline_max_s=inline_max_ms / 1e3)
        engines = EngineSettings(tail=settings.tail_engine, threads=self.torch_threads,
                                 splits=tuple(settings.tail_engine_splits) if settings.tail_engine_splits else None,
                                 decoder=settings.decoder_engine)
        factory = served_model_factory(self.executor, policy, settings.max_request_batch, self.metrics, engines)
        self.repository = ModelRepository(factory, root=settings.model_repository, bundle=settings.bundle)
        self.dataplane = DataPlane(self.repository, self.metrics, max_inflight=settings.max_inflight,
                                   limiter=ClientLimiter(settings.max_concurrency_per_client),
                                   model_control=process is None)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Load the models, bind, start serving and mark every service SERVING; returns the bound gRPC port."""
        s = self.settings
        await self.repository.load_all()
        freeze_loaded()  # the models' objects stay out of the collector's walks (splitinfer/gc_freeze.py)
        options = [
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            # one process owns its port; worker processes of one server share it (cloud_server/processes.py)
            ("grpc.so_reuseport", 1 if self.process else 0),
            # persistent streams: accept the edge's keepalive pings (every 30 s) instead of answering
            # GOAWAY too_many_pings after two of them
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        server = grpc.aio.server(options=options)
        servicer = InferenceServicer(self.dataplane, self.metrics, self.auth)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        address = f"{s.host}:{s.port}"
        try:
            if self.credentials is not None:
                port = server.add_secure_port(address, self.credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the gRPC server to {address} (--host / --port): {exc}; is another "
                          "process listening there, or is the host not an address of this machine?") from exc
        if port == 0:
            raise OSError(f"cannot bind the gRPC server to {address} (--host / --port): is another process "
                          "listening there, or is the host not an address of this machine?")
        if self.auth.required and self.credentials is None and s.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("bearer tokens are configured without TLS on a non-loopback address: tokens travel in "
                        "the clear", extra={"fields": {"host": s.host}})
        if s.metrics_port:
            try:
                self.metrics_endpoint = self.metrics.serve(s.host, s.metrics_port)
            except OSError as exc:
                await server.stop(None)
                raise OSError(f"cannot bind the metrics endpoint to {s.host}:{s.metrics_port} (--metrics-port): "
                              f"{exc.strerror or exc}") from exc
        await server.start()
        self.server, self.port = server, port
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await self.sync_model_health()
        self.dataplane.on_models_changed = self.sync_model_health
        log.info("worker process ready" if self.process else "cloud server ready", extra={"fields": {
            "host": s.host, "port": port, "process": list(self.process) if self.process else None,
            "tls": self.credentials is not None,
            "mutual_tls": s.tls_client_ca is not None, "auth": self.auth.required,
            "metrics_port": self.metrics_endpoint.port if self.metrics_endpoint else None,
            "models": {n: sorted(v, key=int) for n, v in self.repository.models.items()},
            "source": str(s.model_repository or s.bundle), "max_request_batch": s.max_request_batch,
            "batch_max_size": s.batch_max_size, "batch_max_delay_ms": s.batch_max_delay_ms,
            "workers": s.workers, "torch_threads": self.torch_threads,
            "inline_compute_max_ms": s.inline_compute_max_ms if self.torch_threads == 1 else 0.0}})
        return port

    async def sync_model_health(self) -> None:
        """Per-model health services: SERVING for loaded models, NOT_SERVING for the repository's others."""
        loaded = set(self.repository.names())
        known = loaded | {e.name for e in self.repository.index()}
        for name in sorted(known):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if name in loaded
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new inference, answer every accepted request, then stop everything."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        log.info("draining", extra={"fields": {"grace_s": grace, "inflight": self.dataplane.inflight}})
        self.dataplane.begin_drain()
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace
        while self.dataplane.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.server is not None:
            await self.server.stop(max(0.0, deadline - time.monotonic()))
        try:  # queued work of unloaded or reloading models; bounded so a stuck batch cannot hold the exit
            await asyncio.wait_for(self.repository.close(), max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            log.error("batches still running at the end of the grace period", extra={"fields": {}})
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        log.info("stopped", extra={"fields": {"unanswered": self.dataplane.inflight,
                                              "admitted": self.dataplane.admitted,
                                              "completed": self.dataplane.completed}})

    async def wait_for_termination(self) -> None:
        """Wait until the server stops (used after ``start``)."""
        if self.server is not None:
            await self.server.wait_for_termination()


async def run(settings: CloudSettings, process: tuple[int, int] | None = None,
              ready_file: Path | None = None) -> None:
    """Start the server, wait for SIGTERM/SIGINT, then drain and stop (``process``: see :class:`CloudServer`;
    ``ready_file`` is created once serving, for a supervisor)."""
    server = CloudServer(settings, process)
    await server.start()
    if ready_file is not None:
        ready_file.touch()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received, shutting down", extra={"fields": {}})
    await server.stop()


def serve(settings: CloudSettings, process: tuple[int, int] | None = None, ready_file: Path | None = None) -> int:
    """Run the server until a signal; returns the process exit code (0 on a clean shutdown). With
    ``settings.processes`` > 1 this process supervises that many worker processes (:mod:`cloud_server.processes`)."""
    configure_logging(settings.log_level)
    if settings.processes > 1 and process is None:
        from cloud_server.processes import supervise

        return supervise(settings)
    tune_allocator()
    if settings.gil_switch_interval_ms is not None:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1e3)
    try:
        asyncio.run(run(settings, process, ready_file))
    except (BundleError, ConfigError, OSError) as exc:
        log.error("cannot start: %s", exc, extra={"fields": {"error": type(exc).__name__}})
        return 2
    return 0
