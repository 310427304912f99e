"""The edge agent's HTTP API (in-process, fake cloud client) and one real two-process end-to-end run."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from edge_agent.app import create_app
from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from splitinfer.bundle import load_bundle
from splitinfer.daemons import Daemon
from splitinfer.errors import Unavailable
from tests.support.bundles import make_test_bundle
from tests.support.fakes import FakeClient

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
MAX_UPLOAD = 256 * 1024


class FakeCloud(FakeClient):
    """The shared fake client, switched off and on through ``down``."""

    @property
    def down(self) -> bool:
        return self.fail is not None

    @down.setter
    def down(self, value: bool) -> None:
        self.fail = Unavailable("fake server down") if value else None


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Iterator[tuple[TestClient, FakeCloud]]:
    path = make_test_bundle(tmp_path_factory.mktemp("edge-http") / "b", thresholds=(1.01, 1.01))
    bundle = load_bundle(path)
    settings = EdgeSettings(bundle=path, server="127.0.0.1:1", max_upload_bytes=MAX_UPLOAD,
                            max_image_pixels=1024 * 1024, recheck_interval_s=0.01)
    cloud = FakeCloud(bundle)
    runtime = EdgeRuntime(bundle, cloud, settings, metrics=EdgeMetrics())
    with TestClient(create_app(settings, runtime)) as client:
        yield client, cloud
    runtime.close()


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def digit(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)


def post(client: TestClient, data: bytes, name: str = "x.png") -> httpx.Response:
    return client.post("/v1/infer", files={"file": (name, data, "application/octet-stream")})


def test_valid_png_is_answered_by_the_cloud(agent):
    client, _ = agent
    r = client.post("/v1/infer", files={"file": ("x.png", png(digit()), "image/png")},
                    headers={"X-Request-ID": "req-42"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "label", "class_name", "confidence", "decided_by", "degraded", "latency_ms",
                         "bytes_sent", "bytes_received", "energy_j"}
    assert body["id"] == "req-42" and r.headers["x-request-id"] == "req-42"
    assert body["decided_by"] == "cloud" and body["degraded"] is False
    assert 0 <= body["label"] < 10 and body["class_name"]
    assert set(body["latency_ms"]) >= {"head", "exit", "encode", "transfer", "total"}
    assert body["bytes_sent"] > 0 and body["energy_j"]["compute"] >= 0 and body["energy_j"]["radio"] > 0


def test_jpeg_and_npy_uploads(agent):
    client, _ = agent
    rgb = np.random.default_rng(3).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    assert post(agent[0], png(rgb, "JPEG"), "x.jpg").status_code == 200
    r = post(client, npy(np.zeros((1, 1, 28, 28), dtype=np.float32)), "x.npy")
    assert r.status_code == 200 and r.json()["decided_by"] == "cloud"


def test_server_down_answers_degraded(agent):
    client, cloud = agent
    cloud.down = True
    try:
        r = post(client, png(digit(1)))
        assert r.status_code == 200
        assert r.json()["degraded"] is True and r.json()["decided_by"] == 8
        assert client.get("/v1/status").json()["server"]["up"] is False
        assert client.get("/readyz").status_code == 200
    finally:
        cloud.down = False
    for _ in range(200):  # recheck_interval_s is 10 ms
        if post(client, png(digit(2))).json()["decided_by"] == "cloud":
            break
        time.sleep(0.01)
    else:
        pytest.fail("the agent never went back to the cloud")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(("data", "status", "words"), [
    (b"", 400, "empty"),
    (b"definitely not an image" * 10, 415, "not a PNG, JPEG or .npy"),
    (png(digit())[:60], 400, "image"),
    (npy(np.array([1, "a", None], dtype=object)), 400, "object"),
    (npy(np.zeros((3, 28, 28), dtype=np.uint8)), 422, "wrong shape"),
    (npy(np.full((28, 28), np.nan, dtype=np.float32)), 422, "NaN"),
])
def test_malformed_uploads_get_4xx_with_a_message(agent, data, status, words):
    r = post(agent[0], data)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_pickle_upload_is_refused(agent):
    import pickle

    r = post(agent[0], pickle.dumps(_Evil()), "x.npy")
    assert r.status_code == 415


def test_missing_field_and_wrong_content_type(agent):
    client, _ = agent
    r = client.post("/v1/infer", files={"image": ("x.png", png(digit()), "image/png")})
    assert r.status_code == 422 and "missing multipart field 'file'" in r.json()["detail"]
    r = client.post("/v1/infer", data={"file": "just text"})
    assert r.status_code == 415  # urlencoded form, not multipart
    r = client.post("/v1/infer", content=png(digit()), headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/v1/infer", content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert 400 <= r.status_code < 500


def test_oversized_upload_is_413(agent):
    client, _ = agent
    big = npy(np.zeros((MAX_UPLOAD,), dtype=np.uint8))
    r = post(client, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the stream is cut off at the limit
        for _ in range(8):
            yield b"\x00" * (MAX_UPLOAD // 4)

    headers = {"content-type": "multipart/form-data; boundary=x"}
    r = client.post("/v1/infer", content=chunks(), headers=headers)
    assert r.status_code == 413


def test_decompression_bomb_is_refused(agent):
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < MAX_UPLOAD
    r = post(agent[0], buf.getvalue())
    assert r.status_code == 413 and "too large" in r.json()["detail"]


def test_health_status_and_metrics(agent):
    client, _ = agent
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and "server_up" in ready.json()
    status = client.get("/v1/status").json()
    assert status["model"] == "default" and status["split"] == 9 and status["codec"] == "uint8-affine"
    assert [e["boundary"] for e in status["exits"]] == [4, 8]
    assert status["device"]["energy_method"] == "model"
    assert set(status["counters"]["requests"]) == {"edge_exit", "cloud", "fallback", "error"}
    assert {"score", "detected", "alerts", "window", "threshold"} <= set(status["drift"])
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name in ("splitinfer_edge_request_duration_seconds_bucket", "splitinfer_edge_requests_total",
                 "splitinfer_edge_bytes_sent_total", "splitinfer_edge_bytes_received_total",
                 "splitinfer_edge_bandwidth_bytes_per_second", "splitinfer_edge_rtt_seconds",
                 'splitinfer_edge_operating_point{codec="uint8-affine",split="9"} 1.0',
                 'splitinfer_edge_energy_joules_total{component="compute",method="model"}',
                 "splitinfer_edge_server_up", 'splitinfer_edge_exits_total{exit="4"}'):
        assert name in text, name
    assert 'splitinfer_edge_requests_total{outcome="error"}' in text


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_metrics_pass_promtool(agent):
    client, _ = agent
    post(client, png(digit()))
    post(client, b"junk")
    text = client.get("/metrics").text
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ end to end


def _start(name: str, args: list[str], log: Path) -> Daemon:
    return Daemon([sys.executable, "-m", *args], name=name, log_path=log, cwd=REPO,
                  env={**os.environ, "PYTHONPATH": str(REPO)}, stop_timeout=20)


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "cloud_server" / "server.py").is_file(), reason="cloud server not available")
def test_end_to_end_offload_fallback_and_recovery(tmp_path, free_port):
    bundle = make_test_bundle(tmp_path / "bundle", thresholds=(1.01, 1.01))
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    server_cmd = ["cloud_server", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
                  "--port", str(grpc_port), "--metrics-port", str(metrics_port)]
    server_log, agent_log = tmp_path / "server.log", tmp_path / "agent.log"
    server = _start("cloud server", server_cmd, server_log)
    agent_proc = None
    try:
        server.wait_grpc_ready(f"127.0.0.1:{grpc_port}")
        agent_proc = _start("edge agent", ["edge_agent", "run", "--bundle", str(bundle),
                                           "--server", f"127.0.0.1:{grpc_port}", "--host", "127.0.0.1",
                                           "--port", str(http_port), "--timeout-s", "2.0",
                                           "--recheck-interval-s", "0.2"], agent_log)
        agent_proc.wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        image = png(digit())
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:

            def ask() -> dict:
                r = http.post("/v1/infer", files={"file": ("x.png", image, "image/png")})
                assert r.status_code == 200, r.text
                return r.json()

            assert http.get("/readyz").status_code == 200
            for _ in range(100):  # the server may still be warming up
                if ask()["decided_by"] == "cloud":
                    break
                time.sleep(0.1)
            else:
                pytest.fail("never offloaded to the cloud server")
            for _ in range(3):
                body = ask()
                assert body["decided_by"] == "cloud" and body["degraded"] is False and body["bytes_sent"] > 0
            cloud_label = body["label"]

            server.kill()  # SIGKILL mid-run: no goodbye
            for _ in range(5):
                body = ask()
                assert body["degraded"] is True and body["decided_by"] == 8
            assert http.get("/readyz").status_code == 200
            assert http.get("/v1/status").json()["server"]["up"] is False

            server = _start("cloud server", server_cmd, server_log)
            server.wait_grpc_ready(f"127.0.0.1:{grpc_port}")
            for _ in range(300):
                body = ask()
                if body["decided_by"] == "cloud":
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the agent never went back to offloading after the server returned")
            assert body["degraded"] is False and body["label"] == cloud_label
            assert http.get("/v1/status").json()["server"]["up"] is True
            metrics = http.get("/metrics").text
            assert 'splitinfer_edge_requests_total{outcome="fallback"}' in metrics
            assert "splitinfer_edge_server_up 1.0" in metrics
    except BaseException:
        for log in (server_log, agent_log):
            if log.exists():
                print(f"--- {log.name} ---\n{log.read_text()[-4000:]}")
        raise
    finally:
        if agent_proc is not None:
            agent_proc.stop()
            # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM is a clean exit
            assert agent_proc.returncode in (0, -signal.SIGTERM)
            assert "edge agent draining" in agent_log.read_text()
        server.stop()
