"""Configuration of the edge agent: one pydantic-settings class.

Values come from (highest priority first) explicit arguments (the CLI), environment variables prefixed
``SPLITINFER_EDGE_`` (e.g. ``SPLITINFER_EDGE_SERVER=10.0.0.5:8001``), an optional YAML file, then the
defaults below. Names shared with the cloud server are spelled alike (:mod:`splitinfer.settings_common`); the
old names in ``RENAMED`` still work, with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from splitinfer.energy import DEFAULT_DEVICE, load_profiles
from splitinfer.settings_common import LogLevel, RenamingSettings

ENV_PREFIX = "SPLITINFER_EDGE_"


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` allowed) into host and port; ValueError when malformed."""
    text = address.strip()
    if "://" in text:
        example = text.split("://", 1)[1].split("/", 1)[0] or "127.0.0.1:8001"
        raise ValueError(f"server address {address!r} is a URL; give the cloud server's gRPC address as "
                         f"HOST:PORT without a scheme, e.g. {example}")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server address must look like HOST:PORT (e.g. 127.0.0.1:8001), got {address!r}")
    if "/" in host or " " in host:
        raise ValueError(f"server address {address!r} has a path or spaces; give HOST:PORT (e.g. 127.0.0.1:8001)")
    return host.strip("[]"), int(port)


def server_addresses(value: str) -> list[str]:
    """``"h1:p1, h2:p2"`` -> ``["h1:p1", "h2:p2"]``; ValueError when empty or an entry is malformed."""
    addresses = [a.strip() for a in value.split(",") if a.strip()]
    if not addresses:
        raise ValueError("no server address given")
    for address in addresses:
        parse_address(address)
    return addresses


class EdgeSettings(RenamingSettings):
    """Every knob of the edge agent (environment prefix ``SPLITINFER_EDGE_``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)
    # old name -> new name, as the cloud server spells it (field, config key and SPLITINFER_EDGE_ variable
    # alike); the old ones warn
    RENAMED: ClassVar[dict[str, str]] = {"graceful_shutdown_s": "grace_s", "max_pending": "max_inflight"}

    bundle: Path = Field(description="Plan bundle directory written by `splitinfer plan` "
                                     "(plan.json + weights).")
    server: str = Field(description="Cloud server gRPC address HOST:PORT (Open Inference Protocol v2), or several "
                                    "replicas comma-separated: the agent balances over them and retries "
                                    "UNAVAILABLE on another one.")
    head_backend: Literal["torch", "onnx"] = Field("torch", description="Run the head and exits with torch, or "
                                                                        "with ONNX Runtime (fp32 heads; exported at "
                                                                        "start or from onnx_head_dir).")
    onnx_head_dir: Path | None = Field(None, description="A prepared `python -m edge_agent.onnx_head export` "
                                                         "directory (checked by sha256) for head_backend=onnx.")
    stream: bool = Field(False, description="Send offloads over one persistent ModelStreamInfer stream per "
                                            "replica (reopened when it breaks) instead of one unary call each.")
    retry_backoff_s: float = Field(0.02, ge=0, description="Pause before retrying on another replica; doubles "
                                                            "per attempt (jittered), within timeout_s.")
    breaker_failures: int = Field(3, ge=1, description="Consecutive availability failures that open a "
                                                       "replica's circuit breaker (no calls go to it).")
    breaker_cooldown_s: float = Field(1.0, gt=0, description="First time an open breaker waits before one "
                                                             "trial call; doubles per failed trial.")
    breaker_max_cooldown_s: float = Field(30.0, gt=0, description="Longest cooldown of an open breaker.")
    tls: bool = Field(False, description="Use TLS to the server, trusting the system's CA roots unless tls_ca "
                                         "is given (tls_ca or tls_cert also turn TLS on).")
    tls_ca: Path | None = Field(None, description="PEM CA bundle that signed the server certificate; turns TLS "
                                                  "on.")
    tls_cert: Path | None = Field(None, description="PEM client certificate for mutual TLS (with tls_key).")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_server_name: str | None = Field(None, description="Expected name in the server certificate when it "
                                                          "differs from the address host.")
    auth_token_file: Path | None = Field(None, description="File holding the bearer token sent to the server "
                                                           "('authorization: Bearer ...').")
    host: str = Field("127.0.0.1", description="Interface the local HTTP API binds to (loopback by default).")
    port: int = Field(8080, ge=0, le=65535, description="TCP port of the local HTTP API.")
    timeout_s: float = Field(1.0, gt=0, description="Deadline of one offload call; past it the agent answers "
                                                    "degraded from the device.")
    max_upload_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest accepted HTTP request body "
                                                                     "(bytes); larger uploads get 413.")
    max_image_pixels: int = Field(4096 * 4096, gt=0,
                                  description="Most pixels one image may decode to (a decompression-bomb "
                                              "guard, checked from the headers before decoding): a baseline "
                                              "JPEG is decoded at reduced size (1/2..1/8, still covering the "
                                              "model input) and counts at that size; a PNG or progressive "
                                              "JPEG counts at full size. Larger images get 413.")
    decode_concurrency: int = Field(2, ge=1, description="Uploads decoded at the same time (each decode holds "
                                    "about max_image_pixels x 4 bytes, briefly up to x 8 while converting "
                                    "colours: 64-128 MiB at the default).")
    max_inflight: int = Field(64, gt=0, description="Requests admitted at once (waiting for the inference worker "
                                                    "or running); more get 503.")
    device: str = Field(DEFAULT_DEVICE, description="Device power profile (splitinfer/profiles/devices.yaml) "
                                                    "used for the energy estimates.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads for the head (1 keeps CPU-time "
                                                    "accounting per request exact).")
    recheck_interval_s: float = Field(5.0, gt=0,
                                      description="After an offload failure, requests are answered on the "
                                                  "device for this long before the server is tried again.")
    energy_meter: Literal["auto", "model"] = Field("auto", description="auto: measure compute energy with RAPL "
                                                   "(powercap) or an INA3221 (Jetson, board input rail minus "
                                                   "the profile's idle watts) where readable, else the "
                                                   "device's power model.")
    adaptive: bool = Field(True, description="Switch between the bundle's operating points as the link "
                                             "estimate moves (edge_agent/adapt.py).")
    adapt_margin: float = Field(0.1, ge=0, description="Hysteresis: the new grid cell must be nearer than the "
                                "current one by this much in log(bandwidth), log(RTT) space (0.1 ~ 10 %).")
    adapt_min_dwell_s: float = Field(2.0, ge=0, description="Minimum time between two operating-point switches.")
    adapt_rule: Literal["auto", "predicted", "nearest"] = Field(
        "auto", description="How a link estimate picks the operating point (edge_agent/adapt.py): predicted = the "
        "table's configuration with the lowest predicted latency at the estimated link, its edge and server times "
        "rescaled by the agent's own measurements; nearest = the configuration of the nearest grid cell; auto = "
        "predicted when the bundle records the predictions' parts and was planned for latency, else nearest.")
    adapt_min_gain: float = Field(0.03, ge=0, lt=1, description="Rule predicted: switch only to a configuration "
                                  "predicted at least this fraction faster than the one in use.")
    reprofile: bool = Field(True, description="Rescale the plan's predicted edge and server times by the times "
                            "the agent measures (edge_agent/reprofile.py; used by the predicted rule).")
    explore_every: int = Field(5, ge=0, description="Rule predicted: at most one request in this many runs a "
                               "near runner-up configuration instead (one within explore_margin of the one in use "
                               "whose own latency has not been measured lately), so that a near tie is decided "
                               "by measurement rather than by the profile (0: never).")
    explore_margin: float = Field(0.10, ge=0, le=1, description="Rule predicted: explore configurations predicted "
                                  "at most this fraction slower than the one in use.")
    explore_refresh_s: float = Field(60.0, gt=0, description="Rule predicted: a configuration's measured latency "
                                     "counts as recent for this long; a near runner-up older than that is "
                                     "explored again.")
    probe_interval_s: float = Field(5.0, gt=0, description="Probe the link this often when idle: the RTT with "
                                    "ServerReady always, the throughput with a probe_bytes message only when no "
                                    "offload has measured it for this long.")
    probe_bytes: int = Field(32 * 1024, ge=1024, le=4 * 1024 * 1024,
                             description="Size of the throughput probe message.")
    probe_idle_s: float = Field(0.2, ge=0, description="Probe only after the agent has served no request "
                                "for this long, so a probe never competes with requests for the CPU and the "
                                "link (0: probe as soon as probe_interval_s has passed).")
    probe_max_interval_s: float = Field(15.0, gt=0, description="Under continuous load (never idle for "
                                        "probe_idle_s), probe anyway once the last probe is this old.")
    drift_window: int = Field(300, ge=10, description="Requests in the drift monitor's sliding window.")
    drift_threshold: float = Field(0.2, gt=0, le=1, description="Total-variation distance from the calibration "
                                   "reference above which input drift is flagged (metric + log line).")
    grace_s: float = Field(10.0, ge=0, description="On SIGTERM/SIGINT, seconds in-flight requests get to finish.")
    log_level: LogLevel = Field("info", description="Log level of the agent and of uvicorn: debug, info, warning, "
                                                    "error or critical (any case).")

    @field_validator("server")
    @classmethod
    def _check_server(cls, value: str) -> str:
        addresses = server_addresses(value)
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"server addresses repeat: {value!r}")
        return ",".join(addresses)

    @model_validator(mode="after")
    def _tls_pairs(self) -> EdgeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.breaker_max_cooldown_s < self.breaker_cooldown_s:
            raise ValueError("breaker_max_cooldown_s must be >= breaker_cooldown_s")
        return self

    @property
    def use_tls(self) -> bool:
        """True when calls to the server use TLS."""
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    @property
    def servers(self) -> list[str]:
        """The server addresses, in the order given."""
        return server_addresses(self.server)

    @property
    def max_pending(self) -> int:
        """The old name of :attr:`max_inflight`, read-only (edge_agent/runtime.py still reads it)."""
        return self.max_inflight

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        known = load_profiles()
        if value not in known:
            raise ValueError(f"unknown device profile {value!r}; known: {', '.join(sorted(known))}")
        return value

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> EdgeSettings:
        """Settings from ``overrides`` (None values ignored), the environment and an optional YAML file."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if config_file is None:
            return cls(**given)
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")

        class _WithYaml(cls):  # type: ignore[valid-type,misc]
            @classmethod
            def settings_customise_sources(cls_, settings_cls: type[BaseSettings],
                                           init_settings: PydanticBaseSettingsSource,
                                           env_settings: PydanticBaseSettingsSource,
                                           dotenv_settings: PydanticBaseSettingsSource,
                                           file_secret_settings: PydanticBaseSettingsSource,
                                           ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (init_settings, env_settings, cls_.renamed_env_source(settings_cls),
                        YamlConfigSettingsSource(settings_cls, yaml_file=path))

        return cls.model_validate(_WithYaml(**given).model_dump())
