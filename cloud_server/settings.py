"""Configuration of the cloud server: one pydantic-settings class, environment prefix ``SPLITINFER_CLOUD_``.

Every field can be set by environment variable (``SPLITINFER_CLOUD_PORT=9001``) or, for the common ones,
by a ``splitinfer cloud serve`` option, which wins over the environment. Names shared with the edge agent are
spelled alike (:mod:`splitinfer.settings_common`); the old names in ``RENAMED`` still work, with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from splitinfer.settings_common import LogLevel, RenamingSettings
from splitinfer.wire import DEFAULT_MAX_MESSAGE_BYTES

ENV_PREFIX = "SPLITINFER_CLOUD_"


class CloudSettings(RenamingSettings):
    """Settings of the cloud server daemon."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")
    # old name -> new name (field, SPLITINFER_CLOUD_ variable and --flag alike); the old ones warn
    RENAMED: ClassVar[dict[str, str]] = {"max_batch": "max_request_batch"}

    bundle: Path | None = Field(None, description="Plan bundle directory whose tail this server runs (served as "
                                                  "its plan's model name, version 1). Give this or "
                                                  "model_repository.")
    model_repository: Path | None = Field(None, description="Model repository directory: ROOT/<model>/<version>/"
                                                            " bundles (Triton's layout); every version is "
                                                            "loaded at start.")
    host: str = Field("127.0.0.1", description="Address the gRPC and metrics servers bind to. Loopback by "
                                               "default; use 0.0.0.0 to accept remote clients.")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 picks a free one, logged at start).")
    metrics_port: int = Field(8002, ge=0, le=65535,
                              description="Prometheus /metrics HTTP port (0 disables the metrics endpoint).")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0,
                                   description="Largest gRPC message accepted or sent, in bytes.")
    max_request_batch: int = Field(64, ge=1, description="Largest batch (first dimension) one request may carry "
                                                         "(a tail run may join several: batch_max_size).")
    max_inflight: int = Field(512, ge=1, description="Requests admitted at once (queued or running); beyond "
                                                       "that the server answers RESOURCE_EXHAUSTED.")
    batch_max_size: int = Field(32, ge=1, description="Dynamic batching: most samples in one tail run "
                                                      "(1 turns batching off).")
    batch_max_delay_ms: float = Field(2.0, ge=0, description="Dynamic batching: longest a request waits for "
                                                             "others to fill its batch.")
    batch_max_queue: int = Field(256, ge=1, description="Requests waiting per model; a full queue answers "
                                                        "RESOURCE_EXHAUSTED.")
    workers: int = Field(2, ge=1, description="Batches computed at once, each in its own thread (the event "
                                              "loop stays free).")
    processes: int = Field(1, ge=1, le=64, description="Server processes sharing the gRPC port (SO_REUSEPORT; "
                           "the kernel spreads client connections over them), each with its own event loop, "
                           "batcher and workers, under one supervisor that serves /metrics for all. Above 1, "
                           "loading and unloading models through the repository API is off. See "
                           "cloud_server/processes.py.")
    inline_compute_max_ms: float = Field(5.0, ge=0, le=50, description="When the server is idle, run a lone "
                                         "one-sample request on the event loop instead of a worker thread if such "
                                         "runs have taken at most this long (saves the thread hand-off and GIL "
                                         "contention of short models; the loop is blocked that long). 0: never. "
                                         "Only with torch_threads 1.")
    max_concurrency_per_client: int = Field(0, ge=0, description="Requests one client (bearer token name, or "
                                                                 "peer host without tokens) may have in "
                                                                 "flight; 0: unlimited.")
    tls_cert: Path | None = Field(None, description="PEM server certificate (chain); with tls_key turns TLS "
                                                    "on, and plaintext connections are then refused.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle; when set, clients must present a "
                                                         "certificate it signed (mutual TLS).")
    auth_tokens_file: Path | None = Field(None, description="File of bearer tokens (TOKEN or NAME:TOKEN per "
                                                            "line); when set, inference and repository calls "
                                                            "without a valid 'authorization: Bearer' get "
                                                            "UNAUTHENTICATED.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per worker (None: the "
                                      "CPUs divided by workers x processes, at least 1; workers x processes x "
                                      "torch_threads above the CPUs makes every op ~1.5x slower, see "
                                      "splitinfer/omp_teams.py). Above 1, lone "
                                      "jobs never run inline on the event loop.")
    tail_engine: Literal["torch", "torchscript", "onnxruntime", "auto"] = Field(
        "torch", description="What runs the tail at the plan's split, its operating points' splits and the "
        "learned codecs' boundaries (others: torch): torch (eager), torchscript (traced, frozen), onnxruntime, or "
        "auto (the fastest of the three that agree with torch, measured at load and logged). Each engine is "
        "checked against eager torch at load.")
    tail_engine_splits: list[int] | None = Field(None, description="Splits to build the tail engine for instead "
                                                 "of the plan's (JSON list in the environment, e.g. [18]).")
    decoder_engine: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto", description="What runs a learned bottleneck's decoder network: onnxruntime, torch, or auto "
        "(ONNX Runtime when it loads).")
    gil_switch_interval_ms: float | None = Field(None, gt=0, le=100, description="Python's thread switch "
                                                 "interval (sys.setswitchinterval; Python's default 5 ms). Lower "
                                                 "hands the GIL between the event loop and the tail threads sooner.")
    grace_s: float = Field(10.0, ge=0,
                           description="On SIGTERM/SIGINT, seconds in-flight requests get to finish.")
    log_level: LogLevel = Field("info", description="Log level: debug, info, warning, error or critical (any "
                                                    "case).")

    @model_validator(mode="after")
    def _consistent(self) -> CloudSettings:
        if self.bundle is not None and self.model_repository is not None:
            raise ValueError("give either bundle or model_repository, not both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self
