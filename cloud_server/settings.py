"""Configuration of the cloud server: one pydantic-settings class, environment prefix ``SPLITINFER_CLOUD_``.

Every field can be set by environment variable (``SPLITINFER_CLOUD_PORT=9001``) or, for the common ones,
by a ``splitinfer cloud serve`` option, which wins over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from splitinfer.wire import DEFAULT_MAX_MESSAGE_BYTES


class CloudSettings(BaseSettings):
    """Settings of the cloud server daemon."""

    model_config = SettingsConfigDict(env_prefix="SPLITINFER_CLOUD_", extra="forbid")

    bundle: Path | None = Field(None, description="Plan bundle directory whose tail this server runs "
                                                  "(required).")
    host: str = Field("127.0.0.1", description="Address the gRPC and metrics servers bind to. Loopback by "
                                               "default; use 0.0.0.0 to accept remote clients.")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 picks a free one, logged at start).")
    metrics_port: int = Field(8002, ge=0, le=65535,
                              description="Prometheus /metrics HTTP port (0 disables the metrics endpoint).")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0,
                                   description="Largest gRPC message accepted or sent, in bytes.")
    max_batch: int = Field(64, ge=1, description="Largest batch (first dimension) one request may carry.")
    max_inflight: int = Field(64, ge=1, description="Requests admitted at once; beyond that the server "
                                                      "answers RESOURCE_EXHAUSTED.")
    workers: int = Field(2, ge=1, description="Threads running the CPU-bound tail (the event loop stays "
                                              "free).")
    torch_threads: int | None = Field(None, ge=1,
                                      description="torch intra-op threads (None: torch's default).")
    grace_s: float = Field(5.0, ge=0,
                           description="On SIGTERM/SIGINT, seconds in-flight requests get to finish.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
