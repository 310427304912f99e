"""The edge agent's local HTTP API (FastAPI), and :func:`serve` which runs it under uvicorn.

==========================  =========================================================================
``POST /v1/infer``          multipart field ``file`` (PNG, JPEG or ``.npy``) -> JSON answer
``GET /healthz``            liveness (the process answers)
``GET /readyz``             readiness: 200 once the bundle is loaded, 503 while starting or draining;
                            the body says whether the cloud server is reachable (the agent stays ready
                            without it, answering degraded)
``GET /metrics``            Prometheus text format
``GET /v1/status``          model, split, codec, exits, server state, counters, estimates, device
==========================  =========================================================================

Domain errors map to HTTP status codes in exactly one place (the exception handlers in :func:`create_app`):
``InvalidInput`` 400 (``UnsupportedMediaType`` 415, ``InputTooLarge`` 413, ``UnprocessableInput`` and request
validation 422), ``NotFound`` 404, ``Unavailable`` 503, anything else 500. Error bodies are
``{"detail": "<message>"}``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from edge_agent.metrics import CONTENT_TYPE
from edge_agent.runtime import EdgeRuntime, build_runtime
from edge_agent.settings import EdgeSettings
from splitinfer import __version__
from splitinfer.errors import ConfigError, InvalidInput, NotFound, SplitInferError, Unavailable
from splitinfer.gc_freeze import freeze_loaded
from splitinfer.imaging import InputTooLarge, UnprocessableInput, UnsupportedMediaType, decode_upload

log = logging.getLogger("edge_agent.app")

UPLOAD_FIELD = "file"
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

_INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [UPLOAD_FIELD],
            "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary",
                                          "description": "PNG, JPEG or .npy ([H,W], [C,H,W] or [1,C,H,W])"}},
        }}},
    },
}


class InferResponse(BaseModel):
    """The answer to ``POST /v1/infer``."""

    id: str = Field(description="request id (the X-Request-ID header when given, else generated)")
    label: int = Field(description="predicted class index")
    class_name: str
    confidence: float = Field(description="max softmax probability of the answering classifier")
    decided_by: int | Literal["cloud"] = Field(
        description="boundary index of the exit that answered, num_stages when the whole model ran on the "
                    "device, or 'cloud'")
    degraded: bool = Field(description="true when the cloud server was needed but unavailable")
    latency_ms: dict[str, float] = Field(
        description="milliseconds per stage: head, exit, encode, transfer (the call to the server minus the "
                    "server's own time), tail (the server's queue + compute for cloud answers, or the local "
                    "fallback tail), total; 0 for stages the request did not go through")
    bytes_sent: int
    bytes_received: int
    energy_j: dict[str, float] = Field(description="estimated device energy: compute, radio (method 'model')")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    detail: str


def _status_for(exc: Exception) -> int:
    """The one mapping from domain errors to HTTP status codes."""
    if isinstance(exc, InputTooLarge):
        return 413
    if isinstance(exc, UnsupportedMediaType):
        return 415
    if isinstance(exc, UnprocessableInput | RequestValidationError):
        return 422
    if isinstance(exc, InvalidInput):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Unavailable):
        return 503
    return 500


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (InputTooLarge) anything above ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput("malformed Content-Length header")
        if int(declared) > limit:
            raise InputTooLarge(f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InputTooLarge(f"upload exceeds the limit of {limit} bytes")
    return bytes(body)


async def _read_upload(request: Request, limit: int) -> bytes:
    """The bytes of the multipart field ``file``."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType(f"expected a multipart/form-data body with a '{UPLOAD_FIELD}' field, "
                                   f"got content type {ctype or 'none'!r}")
    body = await _read_body(request, limit)

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=4, max_fields=16, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidInput(f"malformed multipart body: {exc.message}") from None
    try:
        upload = form.get(UPLOAD_FIELD)
        if upload is None:
            raise UnprocessableInput(f"missing multipart field '{UPLOAD_FIELD}' (send the image or .npy as "
                                     f"{UPLOAD_FIELD}=@path)")
        if not isinstance(upload, UploadFile):
            raise UnprocessableInput(f"multipart field '{UPLOAD_FIELD}' must be a file upload, "
                                     "not a text value")
        return await upload.read()
    finally:
        await form.close()


def create_app(settings: EdgeSettings, runtime: EdgeRuntime | None = None) -> FastAPI:
    """The FastAPI app. Builds the runtime from ``settings`` (bundle, cloud client) unless one is given;
    a runtime built here is closed on shutdown, a given one is left to its owner."""
    owns_runtime = runtime is None
    rt: EdgeRuntime = runtime if runtime is not None else build_runtime(settings)
    state: dict[str, Any] = {"ready": False}
    decode_slots = asyncio.Semaphore(settings.decode_concurrency)

    async def _probe_when_idle() -> None:
        """Measure the link when no offload has for a while (e.g. while running edge-only)."""
        while True:
            await asyncio.sleep(rt.links.period_s)
            if rt.links.needs_probe():
                await run_in_threadpool(rt.links.tick)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(rt.probe_server)
        except Exception:  # a probe must never stop the agent from starting
            log.warning("initial probe of the cloud server failed", exc_info=True)
        freeze_loaded()  # the bundle's objects stay out of the collector's walks (splitinfer/gc_freeze.py)
        state["ready"] = True
        log.info("edge agent ready: model=%s split=%d codec=%s server=%s up=%s", rt.plan.model.name, rt.split,
                 rt.codec_name, settings.server, rt.server_up)
        prober = asyncio.create_task(_probe_when_idle()) if settings.adaptive else None
        try:
            yield
        finally:
            if prober is not None:
                prober.cancel()
            state["ready"] = False
            log.info("edge agent draining")
            if owns_runtime:
                await run_in_threadpool(rt.close)

    app = FastAPI(title="splitinfer edge agent", version=__version__, lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                             415: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                             503: {"model": ErrorResponse}})
    app.state.runtime = rt
    app.state.settings = settings

    def _error(request: Request, exc: Exception, message: str) -> JSONResponse:
        code = _status_for(exc)
        if request.url.path == "/v1/infer":
            rt.record_error()
        if code >= 500:
            log.error("request %s %s failed: %s", request.method, request.url.path, message,
                      exc_info=code == 500)
        else:
            log.info("request %s %s rejected (%d): %s", request.method, request.url.path, code, message)
        return JSONResponse({"detail": message}, status_code=code)

    @app.exception_handler(SplitInferError)
    async def _domain_error(request: Request, exc: SplitInferError) -> JSONResponse:
        return _error(request, exc, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return _error(request, exc, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(request, exc, f"internal error: {type(exc).__name__}")

    @app.post("/v1/infer", response_model=InferResponse, openapi_extra=_INFER_OPENAPI,
              summary="Classify one image or .npy tensor")
    async def infer(request: Request) -> JSONResponse:
        """Decode the upload, run head/exits/offload on the inference worker and answer JSON."""
        request_id = _request_id(request)
        data = await _read_upload(request, settings.max_upload_bytes)
        async with decode_slots:  # bounds the memory of concurrent image decodes
            x = await run_in_threadpool(decode_upload, data, rt.plan.input, settings.max_image_pixels)
        result = await asyncio.wrap_future(rt.submit(x, request_id, raw=data))
        body = InferResponse(**result.to_dict()).model_dump()
        return JSONResponse(body, headers={REQUEST_ID_HEADER: request_id})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness")
    async def readyz() -> JSONResponse:
        """200 once the bundle is loaded (server reachability is reported, not required)."""
        body = {"ready": state["ready"], "model": rt.plan.model.name, "split": rt.split,
                "server": settings.server, "server_up": rt.server_up}
        return JSONResponse(body, status_code=200 if state["ready"] else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        """The agent's metrics in the Prometheus text exposition format."""
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/status", summary="Configuration and state")
    async def status() -> dict[str, Any]:
        """Model, split, codec, exits, server state, counters, bandwidth/RTT estimates and device profile."""
        return {"version": __version__, **rt.status()}

    return app


def configure_logging(level: str) -> None:
    """Structured ``key=value`` log lines on stderr."""
    logging.basicConfig(level=level.upper(),
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    logging.getLogger("edge_agent").setLevel(level.upper())


def serve(settings: EdgeSettings) -> None:
    """Load the bundle, connect the cloud client and serve the HTTP API until SIGTERM/SIGINT.

    On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish (up to
    ``grace_s``), then the runtime drains its worker and closes the client.
    """
    import uvicorn

    configure_logging(settings.log_level)
    sock = listen_socket(settings.host, settings.port)  # before loading: a busy port fails first, and clearly
    try:
        app = create_app(settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                timeout_graceful_shutdown=settings.grace_s, access_log=False,
                                log_config=None)
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        log.info("edge agent listening on http://%s:%d", shown, sock.getsockname()[1])
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for the HTTP API (uvicorn listens on it); ConfigError naming the address and the
    setting when the port is taken or the address is not local."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: the host does not resolve ({exc.strerror}); "
                          "check --host / SPLITINFER_EDGE_HOST") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # now: a second agent on the same port fails here, not later inside uvicorn
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        hint = ("another process is listening there; choose another --port / SPLITINFER_EDGE_PORT"
                if exc.errno == errno.EADDRINUSE else "check --host / --port")
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc} ({hint})") from None
    return sock
