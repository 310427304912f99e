"""`plan probe` against a real server behind the link emulator: RTT, throughput and overhead."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench.linkemu import LinkSettings, start_in_thread
from partitioner.cli import app
from partitioner.probe import probe, request_overhead_bytes
from tests.support.servers import free_port, start_server

pytestmark = pytest.mark.slow  # live link probes (about 20 s)


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    proc = start_server(bundle_dir, free_port(), free_port(), tmp_path_factory.mktemp("probe") / "server.log")
    yield proc
    proc.stop()


def test_probe_measures_the_emulated_link(server):
    rate, delay = 20e6, 0.010
    with start_in_thread("127.0.0.1", server.port, LinkSettings(rate_bps=rate, delay_s=delay)) as emu:
        res = probe(f"127.0.0.1:{emu.port}", target_s=0.15)
    assert res.rtt_ms >= 2 * delay * 1e3 * 0.98  # never below the emulated round trip
    assert res.rtt_ms < 2 * delay * 1e3 + 30  # a loose sanity bound: no spurious extra round trips
    assert res.bandwidth_bps is not None
    assert 0.75 * rate <= res.bandwidth_bps <= 1.25 * rate, res
    assert res.sizes == sorted(res.sizes) and res.sizes[-1] >= 64 * 1024
    assert 100 < res.request_overhead_bytes < 1000


def test_overhead_grows_with_frames_only():
    small, big = request_overhead_bytes(1000), request_overhead_bytes(1_000_000)
    assert big - small == pytest.approx(9 * (1_000_000 // 16384), abs=30)


def test_probe_cli_json_and_dead_server(server, free_port):
    res = CliRunner().invoke(app, ["probe", "--server", f"127.0.0.1:{server.port}", "--json", "--target-ms", "20",
                                   "--max-bytes", str(1 << 20)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["rtt_ms"] > 0 and d["bandwidth_bps"] > 0 and d["address"].endswith(str(server.port))
    res = CliRunner().invoke(app, ["probe", "--server", f"127.0.0.1:{free_port()}"])
    assert res.exit_code == 2 and "cannot connect" in res.output
