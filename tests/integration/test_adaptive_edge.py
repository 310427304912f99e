"""The edge runtime adapts its operating point to the measured link: a real server behind the link emulator,
whose bandwidth drops mid-run."""

from __future__ import annotations

import time

import pytest
import torch

from bench.linkemu import LinkSettings, start_in_thread
from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from edge_agent.transport import CloudClient
from splitinfer.bundle import OperatingPoint, load_bundle, read_plan
from tests.support.bundles import make_test_bundle
from tests.support.servers import free_port, start_server

pytestmark = pytest.mark.slow  # a bandwidth drop over the emulator (about 20 s)


@pytest.fixture(scope="module")
def adaptive_bundle(tmp_path_factory):
    """The test bundle with a two-column table: cloud-only on a fast link, edge-only on a slow one."""
    path = make_test_bundle(tmp_path_factory.mktemp("adaptive") / "b")
    plan = read_plan(path)
    n = len(plan.boundaries) - 1

    def point(bw, split):
        return OperatingPoint(bandwidth_bps=bw, rtt_ms=5, split=split, codec="uint8-affine", exits=[],
                              expected_latency_ms=1.0, expected_bytes=1.0)

    plan = plan.model_copy(update={"operating_points": [point(10e6, n), point(200e6, 0)]})
    (path / "plan.json").write_text(plan.model_dump_json())
    return path


def test_runtime_follows_a_bandwidth_drop(adaptive_bundle, tmp_path):
    bundle = load_bundle(adaptive_bundle)
    n = bundle.staged.num_stages
    server = start_server(adaptive_bundle, free_port(), free_port(), tmp_path / "server.log")
    try:
        with start_in_thread("127.0.0.1", server.port, LinkSettings(rate_bps=200e6, delay_s=0.002)) as emu:
            address = f"127.0.0.1:{emu.port}"
            settings = EdgeSettings(bundle=adaptive_bundle, server=address, timeout_s=10, adapt_min_dwell_s=0,
                                    probe_interval_s=0.001, probe_bytes=256 * 1024)
            metrics = EdgeMetrics()
            rt = EdgeRuntime(bundle, CloudClient(address, bundle.plan.model.name, timeout_s=10), settings,
                             metrics=metrics)
            x = torch.randn(1, *bundle.plan.input.shape, generator=torch.Generator().manual_seed(0))
            try:
                for _ in range(3):
                    assert rt.probe_link()
                assert rt.split == 0, rt.status()["estimates"]  # a fast link: cloud-only
                assert rt.infer(x, "fast").decided_by == "cloud"
                emu.update(LinkSettings(rate_bps=10e6, delay_s=0.002))
                time.sleep(0.05)
                for _ in range(8):
                    rt.probe_link()
                    if rt.split == n:
                        break
                assert rt.split == n, rt.status()["estimates"]  # a slow link: edge-only
                est = rt.status()["estimates"]
                assert 5e6 <= est["bandwidth_bps"] <= 15e6 and est["changes"] >= 1
                res = rt.infer(x, "slow")
                assert res.decided_by == n and res.bytes_sent == 0
                assert metrics.registry.get_sample_value("splitinfer_edge_operating_point_switches_total") == 2
                assert metrics.registry.get_sample_value("splitinfer_edge_link_changes_total") >= 1
                assert rt.status()["adaptive"]["switches"] == 2
            finally:
                rt.close()
    finally:
        server.stop()
