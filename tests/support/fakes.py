"""In-process stand-ins for the edge runtime's collaborators: a cloud client that runs the tail itself (or fails
on demand), a clock the test moves, and an :class:`~edge_agent.runtime.EdgeRuntime` built on them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from splitinfer.bundle import Bundle, ExitSpec
from splitinfer.errors import Unavailable
from tests.support.bundles import TEST_EXITS


@dataclass
class FakeResult:
    logits: np.ndarray
    bytes_sent: int
    bytes_received: int
    server_queue_ms: float
    server_compute_ms: float
    round_trip_s: float


class FakeClient:
    """Same shape as edge_agent.transport.CloudClient; runs the tail in-process, or fails on demand."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.calls = 0
        self.fail: Exception | None = None
        self.bad_logits = False
        self.closed = False

    def infer_features(self, payload: bytes, meta: dict, split: int, codec: str,
                       request_id: str = "") -> FakeResult:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        x = self.bundle.codec_for(codec, split).decode(payload, meta)
        with torch.inference_mode():
            logits = self.bundle.staged.run(x, split, self.bundle.num_stages).numpy()
        if self.bad_logits:
            logits = logits[:, :3]
        return FakeResult(logits, len(payload) + 120, 80, 0.2, 1.5, 0.004)

    def server_ready(self) -> bool:
        return self.fail is None

    def check_ready(self) -> None:
        if self.fail is not None:
            raise Unavailable(f"fake server down: {self.fail}")

    def probe_rtt(self) -> float:
        """A loopback-like round trip (or the configured failure)."""
        if self.fail is not None:
            raise self.fail
        return 0.0005

    def probe_transfer(self, nbytes: int) -> tuple[int, float]:
        """``nbytes`` over a 1 Gbit/s link (or the configured failure)."""
        if self.fail is not None:
            raise self.fail
        return nbytes, nbytes * 8 / 1e9 + 0.0005

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def with_plan(bundle: Bundle, thresholds: tuple[float, float] = (0.5, 0.5),
              split: int | None = None) -> Bundle:
    """``bundle`` with the exits at ``TEST_EXITS`` set to ``thresholds`` (and the split moved, if given)."""
    exits = [ExitSpec(boundary=b, threshold=t) for b, t in zip(TEST_EXITS, thresholds, strict=True)]
    update: dict = {"exits": exits}
    if split is not None:
        update["split"] = split
    return dataclasses.replace(bundle, plan=bundle.plan.model_copy(update=update))


def runtime_settings(bundle: Bundle, **kw) -> EdgeSettings:
    """Edge settings for ``bundle``: an unreachable server address, a 5 s recheck interval, ``kw`` on top."""
    return EdgeSettings(bundle=bundle.path, server="127.0.0.1:1", recheck_interval_s=5.0, **kw)


def make_runtime(bundle: Bundle, clock: FakeClock | None = None, **kw) -> tuple[EdgeRuntime, FakeClient]:
    """An :class:`EdgeRuntime` for ``bundle`` on a :class:`FakeClient` and a :class:`FakeClock`."""
    client = FakeClient(bundle)
    rt = EdgeRuntime(bundle, client, runtime_settings(bundle, **kw), metrics=EdgeMetrics(),
                     clock=clock or FakeClock())
    return rt, client


def sample(seed: int = 0) -> torch.Tensor:
    """One seeded random input ``[1, 1, 28, 28]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, 28, 28, generator=g)
