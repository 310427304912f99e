"""The one place where domain errors become gRPC status codes.

===================  =====================
exception            gRPC status
===================  =====================
InvalidInput         INVALID_ARGUMENT
NotFound             NOT_FOUND
Overloaded           RESOURCE_EXHAUSTED
Unavailable          UNAVAILABLE
DeadlineExceeded     DEADLINE_EXCEEDED
Unauthenticated      UNAUTHENTICATED
BundleError          FAILED_PRECONDITION (a model in the repository cannot be loaded)
ModelControlOff      FAILED_PRECONDITION (load/unload in a multi-process server)
anything else        INTERNAL (traceback logged, details hidden from the client)
===================  =====================

The server keeps serving after any of them. :func:`cloud_server.servicer.rpc` applies this mapping to every rpc.
"""

from __future__ import annotations

import logging

import grpc

from splitinfer.errors import (
    BundleError,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    SplitInferError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)


class Overloaded(Unavailable):
    """Too many requests in flight; the client should back off or go elsewhere."""


class ModelControlOff(SplitInferError):
    """Loading or unloading models is off (a server of several processes: each holds its own models)."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to ``(status code, message for the client)``; logs unexpected ones with traceback."""
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, (BundleError, ModelControlOff)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    log.error("unexpected error while serving a request: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}); see the server log"

