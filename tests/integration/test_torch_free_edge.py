"""The edge role without torch: ``pip install '.[edge]'`` into a fresh venv (``pip show torch`` fails there),
the demo bundle's head exported to ONNX, and ``splitinfer edge run`` from that venv against a real cloud
server answers 1,000 Fashion-MNIST PNGs exactly as the torch agent does, without ever importing torch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from splitinfer.daemons import Daemon, free_port
from tests.support.servers import ROOT, start_server

pytestmark = pytest.mark.slow

IMAGES = 1000


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    """A fresh venv holding splitinfer with the ``edge`` extra only (a wheel built from this checkout)."""
    venv = tmp_path_factory.mktemp("edge-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    proc = subprocess.run([str(pip), "install", "-q", "--disable-pip-version-check", f"{ROOT}[edge]"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    from splitinfer.cli.demo import plan_demo_bundle

    return plan_demo_bundle(tmp_path_factory.mktemp("demo") / "bundle").path


@pytest.fixture(scope="module")
def exported_head(demo_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "head"
    subprocess.run([sys.executable, "-m", "edge_agent.onnx_head", "export", "--bundle", str(demo_bundle),
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def server(demo_bundle, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "cloud.log"
    proc = start_server(demo_bundle, free_port(), 0, log)
    yield proc.address
    proc.stop()


def _agent(command: list[str], bundle: Path, server: str, log: Path, env: dict[str, str], cwd: Path) -> tuple[
        Daemon, str]:
    port = free_port()
    agent = Daemon([*command, "run", "--bundle", str(bundle), "--server", server, "--host", "127.0.0.1",
                    "--port", str(port)], name="edge agent", log_path=log, env=env, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    agent.wait_http_ready(f"{base}/readyz", timeout=180)
    return agent, base


def _answers(base: str, pngs: list[bytes]) -> list[dict]:
    out = []
    with httpx.Client(timeout=60.0) as http:
        for i, png in enumerate(pngs):
            r = http.post(f"{base}/v1/infer", files={"file": (f"{i}.png", png, "image/png")})
            assert r.status_code == 200, r.text
            out.append(r.json())
    return out


def test_edge_agent_serves_without_torch(edge_venv, demo_bundle, exported_head, server, tmp_path):
    from splitinfer.cli.demo import encode_png
    from splitinfer.data import load_fashion_mnist

    shown = subprocess.run([str(edge_venv / "bin" / "pip"), "show", "torch"], capture_output=True, text=True)
    assert shown.returncode != 0, f"torch is installed in the edge venv:\n{shown.stdout}"

    test = load_fashion_mnist("test")
    pngs = [encode_png(test.images[i]) for i in range(IMAGES)]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITINFER_") and k != "PYTHONPATH"}
    base_env.update(SPLITINFER_EDGE_ADAPTIVE="false", PYTHONUNBUFFERED="1")

    # the torch agent: this checkout, the bundle in torch
    torch_agent, torch_base = _agent([sys.executable, "-m", "edge_agent"], demo_bundle, server,
                                     tmp_path / "torch-agent.log", {**base_env, "PYTHONPATH": str(ROOT)}, ROOT)
    try:
        expected = _answers(torch_base, pngs)
        torch_status = httpx.get(f"{torch_base}/v1/status").json()
    finally:
        torch_agent.stop()
    assert torch_status["head_backend"] == "torch" and torch_status["torch_imported"] is True

    # the torch-free agent: the edge venv's own `splitinfer` (run outside the checkout: nothing of it on the path)
    onnx_env = {**base_env, "SPLITINFER_EDGE_HEAD_BACKEND": "onnx", "SPLITINFER_EDGE_ONNX_HEAD_DIR": str(exported_head)}
    agent, base = _agent([str(edge_venv / "bin" / "splitinfer"), "edge"], demo_bundle, server,
                         tmp_path / "onnx-agent.log", onnx_env, tmp_path)
    try:
        got = _answers(base, pngs)
        status = httpx.get(f"{base}/v1/status").json()
    finally:
        agent.stop()
    log = (tmp_path / "onnx-agent.log").read_text()
    assert status["head_backend"] == "onnx" and status["torch_imported"] is False, log[-3000:]
    assert status["counters"]["requests"]["error"] == 0

    decided = [a["decided_by"] for a in expected]
    assert "cloud" in decided and any(isinstance(d, int) for d in decided), "the demo plan should exit and offload"
    assert not any(a["degraded"] for a in expected + got)
    mismatches = [(i, e["label"], g["label"], e["decided_by"], g["decided_by"])
                  for i, (e, g) in enumerate(zip(expected, got, strict=True))
                  if (e["label"], e["decided_by"]) != (g["label"], g["decided_by"])]
    assert not mismatches, f"{len(mismatches)} of {IMAGES} answers differ (index, torch, onnx): {mismatches[:10]}"
