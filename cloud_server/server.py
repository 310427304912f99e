"""The cloud server process: grpc.aio server, health, reflection, metrics endpoint, signals, logging.

:func:`serve` is what ``splitinfer cloud serve`` hands off to. On SIGTERM or SIGINT the server marks
itself NOT_SERVING (health and ServerReady), refuses new inference with UNAVAILABLE, lets in-flight
requests finish within ``grace_s`` and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud_server.dataplane import DataPlane
from cloud_server.metrics import MetricsEndpoint, ServerMetrics
from cloud_server.servicer import InferenceServicer
from cloud_server.settings import CloudSettings
from cloud_server.tail import TailRuntime
from splitinfer.allocator import tune_allocator
from splitinfer.bundle import load_bundle
from splitinfer.errors import BundleError
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
    root.setLevel(level)


class CloudServer:
    """A configured, not yet started server; ``await start()``, then ``await stop()``."""

    def __init__(self, settings: CloudSettings):
        if settings.bundle is None:
            raise BundleError("no bundle given: pass --bundle DIR or set SPLITINFER_CLOUD_BUNDLE")
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.bundle = load_bundle(settings.bundle)
        self.tail = TailRuntime(self.bundle, max_batch=settings.max_batch)
        self.metrics = ServerMetrics(self.tail.model_name)
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="tail")
        self.dataplane = DataPlane(self.tail, self.executor, self.metrics, max_inflight=settings.max_inflight)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind, start serving and mark every service SERVING; returns the bound gRPC port."""
        s = self.settings
        options = [
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        servicer = InferenceServicer(self.dataplane, self.metrics)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        address = f"{s.host}:{s.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC server to {address}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        if s.metrics_port:
            self.metrics_endpoint = self.metrics.serve(s.host, s.metrics_port)
        await server.start()
        self.server, self.port = server, port
        for service in ("", INFERENCE_SERVICE, self.tail.model_name):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("cloud server ready", extra={"fields": {
            "host": s.host, "port": port,
            "metrics_port": self.metrics_endpoint.port if self.metrics_endpoint else None,
            "model": self.tail.model_name, "stages": self.tail.num_stages, "bundle": str(s.bundle),
            "max_batch": s.max_batch, "workers": s.workers, "torch_threads": torch.get_num_threads()}})
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new inference, let in-flight requests finish, then stop everything."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        log.info("draining", extra={"fields": {"grace_s": grace, "inflight": self.dataplane.inflight}})
        self.dataplane.draining = True
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        log.info("stopped", extra={"fields": {}})

    async def wait_for_termination(self) -> None:
        """Wait until the server stops (used after ``start``)."""
        if self.server is not None:
            await self.server.wait_for_termination()


async def run(settings: CloudSettings) -> None:
    """Start the server, wait for SIGTERM/SIGINT, then drain and stop."""
    server = CloudServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received, shutting down", extra={"fields": {}})
    await server.stop()


def serve(settings: CloudSettings) -> int:
    """Run the server until a signal; returns the process exit code (0 on a clean shutdown)."""
    configure_logging(settings.log_level)
    tune_allocator()
    try:
        asyncio.run(run(settings))
    except (BundleError, OSError) as exc:
        log.error("cannot start: %s", exc, extra={"fields": {"error": type(exc).__name__}})
        return 2
    return 0
