"""Chaos: 2,000 requests while the cloud server is killed and restarted twice and the link emulator resets
and stalls connections. Every request is answered exactly once (by the cloud or, degraded, on the device);
none is lost or duplicated, and the agent goes back to the cloud after each restart."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bench.linkemu import LinkSettings, start_in_thread
from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from edge_agent.transport import CloudClient
from splitinfer.bundle import load_bundle
from splitinfer.head import ExitPolicy
from tests.support.servers import free_port, start_server

pytestmark = pytest.mark.slow  # 2,000 requests through crashes (about 35 s)

REQUESTS = 2000
CLIENTS = 4


def test_every_request_is_answered_exactly_once_through_crashes_and_a_lossy_link(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    port, metrics_port = free_port(), free_port()
    server = start_server(bundle_dir, port, metrics_port, tmp_path / "server.log")
    servers = [server]
    link = LinkSettings(rate_bps=50e6, delay_s=0.001, stall_prob=0.01, stall_s=0.05, drop_prob=0.005)
    with start_in_thread("127.0.0.1", port, link) as emu:
        address = f"127.0.0.1:{emu.port}"
        cfg = EdgeSettings(bundle=bundle_dir, server=address, timeout_s=0.5, recheck_interval_s=0.2,
                           max_inflight=REQUESTS, adaptive=False)
        rt = EdgeRuntime(bundle, CloudClient(address, bundle.plan.model.name, timeout_s=0.5), cfg,
                         metrics=EdgeMetrics())
        # thresholds above 1: no exit fires, so every answer comes from the cloud or the degraded fallback
        rt.policy = ExitPolicy(dict.fromkeys(rt.policy.thresholds, 1.01))
        g = torch.Generator().manual_seed(0)
        inputs = torch.randn(64, 1, *bundle.plan.input.shape, generator=g)
        answers: dict[str, list] = {}
        lock = threading.Lock()
        done = Counter()

        def client(worker: int) -> None:
            for i in range(worker, REQUESTS, CLIENTS):
                rid = f"req-{i}"
                res = rt.submit(inputs[i % len(inputs)], rid).result(timeout=60)
                with lock:
                    answers.setdefault(rid, []).append(res)
                    done["n"] += 1

        def chaos() -> None:
            """Kill (SIGKILL) and restart the server twice, at about 20 % and 55 % of the run."""
            for start_at in (0.20, 0.55):
                while done["n"] < start_at * REQUESTS:
                    time.sleep(0.01)
                servers[-1].proc.kill()
                servers[-1].proc.wait(10)
                while done["n"] < (start_at + 0.1) * REQUESTS:
                    time.sleep(0.01)
                servers.append(start_server(bundle_dir, port, metrics_port, tmp_path / "server.log"))

        try:
            with ThreadPoolExecutor(CLIENTS + 1) as pool:
                futures = [pool.submit(client, w) for w in range(CLIENTS)] + [pool.submit(chaos)]
                for f in futures:
                    f.result(timeout=600)
            # after the last restart the agent offloads again (it retries the server every 0.2 s; the lossy
            # link may cost a few more attempts)
            recovered = []
            while len(recovered) < 100 and not any(r.outcome == "cloud" for r in recovered):
                recovered.append(rt.infer(inputs[0], f"after-{len(recovered)}"))
                time.sleep(0.05)
        finally:
            rt.close()
            servers[-1].stop()
        stats = emu.stats

    assert len(answers) == REQUESTS and all(len(v) == 1 for v in answers.values())  # once, none lost
    assert sorted(answers) == sorted(f"req-{i}" for i in range(REQUESTS))
    outcomes = Counter(v[0].outcome for v in answers.values())
    assert set(outcomes) <= {"cloud", "fallback"}, outcomes
    assert outcomes["fallback"] > 0 and outcomes["cloud"] > 0, outcomes
    assert all(v[0].degraded == (v[0].outcome == "fallback") for v in answers.values())
    assert all(0 <= v[0].label < len(bundle.plan.input.labels) for v in answers.values())
    assert any(r.outcome == "cloud" for r in recovered)
    assert len(servers) == 3 and stats.stalls > 0
    print(f"outcomes {dict(outcomes)}, stalls {stats.stalls}, resets {stats.drops}, connections {stats.connections}")
    counted = rt.metrics.registry.get_sample_value
    assert counted("splitinfer_edge_requests_total", {"outcome": "error"}) == 0
