"""What a new user meets after the demo: mistakes get messages that name the flag, no tracebacks, honest
signals. One test per finding of the new-user walkthrough (the README's own commands are tests/e2e/test_readme.py).
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud_server.cli import app as cloud_app
from edge_agent.cli import app as edge_app
from edge_agent.transport import CloudClient
from partitioner.cli import app as plan_app
from partitioner.cost import format_bandwidth, format_duration, parse_bandwidth, parse_duration
from partitioner.probe import ProbeResult
from splitinfer.errors import Unavailable
from tests.support.fakes import FakeClient
from tests.support.servers import ROOT, start_server

pytestmark = pytest.mark.slow  # 43 CLI runs as subprocesses (about 40 s)

PYDANTIC_NOISE = ("errors.pydantic.dev", "validation error", "Traceback")


def _clean(output: str) -> None:
    for noise in PYDANTIC_NOISE:
        assert noise not in output, output


# ---------------------------------------------------------------------------------------- 3, 6: numbers


def test_probe_prints_flags_that_plan_make_reads():
    for bps in (2.22e9, 5e6, 512e3, 1234.5, 40.0):
        res = ProbeResult("h:1", rtt_ms=0.31, rtt_ms_samples=[0.31], bandwidth_bps=bps, sizes=[1024, 65536],
                          call_ms=[1.0, 2.0], request_overhead_bytes=245)
        flags = res.make_flags()
        bw = re.search(r"--bandwidth (\S+)", flags).group(1)
        assert "e+" not in flags and "e-" not in flags
        assert parse_bandwidth(bw) == pytest.approx(bps, rel=1e-3)
        assert parse_duration(re.search(r"--rtt (\S+)", flags).group(1)) == pytest.approx(0.31e-3)
    assert format_bandwidth(2.22e9) == "2.22gbit" and format_duration(0.0203) == "20.3ms"


@pytest.mark.parametrize("text", ["5MB", "5MB/s", "5mbps", "5 Mbps", "800kB/s", "5b"])
def test_byte_or_ambiguous_bandwidth_units_are_refused(text):
    with pytest.raises(ValueError, match="ambiguous"):
        parse_bandwidth(text)
    assert parse_bandwidth("5mbit") == parse_bandwidth("5Mbit/s") == parse_bandwidth("5000000") == 5e6


@pytest.mark.parametrize("args, flag", [
    (["--edge-slowdown", "-2"], "--edge-slowdown"), (["--server-load", "-5"], "--server-load"),
    (["--max-bytes", "-1"], "--max-bytes"), (["--repeats", "0"], "--repeats"), (["--loss", "1"], "--loss"),
    (["--epsilon", "0"], "--epsilon"), (["--bandwidth", "5MB"], "--bandwidth"), (["--rtt", "fast"], "--rtt"),
    (["--splits", "middle"], "--splits"), (["--objective", "speed"], "--objective"),
    (["--score", "foo"], "--score"), (["--head", "int4"], "--head"),
    (["--calibration-mode", "x"], "--calibration-mode"),
])
def test_plan_make_refuses_bad_numbers_before_any_work(tmp_path, args, flag):
    res = CliRunner().invoke(plan_app, ["make", "--out", str(tmp_path / "b"), *args])
    assert res.exit_code == 2, res.output
    assert flag in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()  # refused before planning


def test_plan_make_out_existing_file_is_refused_first(tmp_path):
    existing = tmp_path / "a-file"
    existing.write_text("x")
    res = CliRunner().invoke(plan_app, ["make", "--out", str(existing)])
    assert res.exit_code == 2 and "--out" in res.output and "is not a directory" in res.output
    assert existing.read_text() == "x"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "splitinfer", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("args, expect", [
    (["--requests", "0"], "--requests"), (["--requests", "20000"], "--requests"),
    (["--data-dir", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
    (["--bandwidth", "5MB"], "ambiguous"), (["--device", "toaster"], "unknown device profile"),
])
def test_demo_refuses_bad_options_without_a_traceback(tmp_path, args, expect):
    proc = _cli("demo", "--workdir", str(tmp_path / "demo"), *args)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------- 8: flag names


@pytest.mark.parametrize("args, expect", [
    ([], ["--bundle is required (or set SPLITINFER_EDGE_BUNDLE)", "--server is required"]),
    (["--server", "127.0.0.1:1", "--port", "-1"],
     ["--port / SPLITINFER_EDGE_PORT (-1): must be greater than or equal to 0"]),
    (["--server", "127.0.0.1:1", "--timeout-s", "0"],
     ["--timeout-s / SPLITINFER_EDGE_TIMEOUT_S (0.0): must be greater than 0"]),
    (["--server", "localhost"],
     ["--server / SPLITINFER_EDGE_SERVER ('localhost'): server address must look like HOST:PORT"]),
    (["--server", "http://127.0.0.1:8001/v2"], ["is a URL", "without a scheme, e.g. 127.0.0.1:8001\n"]),
])
def test_edge_run_names_the_flag(bundle_dir, args, expect, monkeypatch):
    for var in ("SPLITINFER_EDGE_BUNDLE", "SPLITINFER_EDGE_SERVER"):
        monkeypatch.delenv(var, raising=False)
    full = ["run", *args] if not args else ["run", "--bundle", str(bundle_dir), *args]
    res = CliRunner().invoke(edge_app, full)
    assert res.exit_code == 2, res.output
    for text in expect:
        assert text in res.stderr, res.stderr
    _clean(res.output)


def test_cloud_serve_names_the_flag(bundle_dir):
    res = CliRunner().invoke(cloud_app, ["serve", "--bundle", str(bundle_dir), "--workers", "0", "--port", "-1"])
    assert res.exit_code == 2
    assert "--workers / SPLITINFER_CLOUD_WORKERS (0): must be greater than or equal to 1" in res.stderr
    assert "--port / SPLITINFER_CLOUD_PORT (-1): must be greater than or equal to 0" in res.stderr
    _clean(res.output)


# ---------------------------------------------------------------------------------------- 4: wrong servers


class _Http1(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http1_port():
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Http1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def test_refused_port_and_http_port_get_different_reasons(free_port, http1_port):
    with (CloudClient(f"127.0.0.1:{free_port()}", "default") as c,
          pytest.raises(Unavailable, match="connection refused: nothing listens there")):
        c.check_ready()
    with (CloudClient(f"127.0.0.1:{http1_port}", "default") as c,
          pytest.raises(Unavailable, match="answers, but not with gRPC")):
        c.check_ready()


def test_classify_fails_on_an_unreachable_server_and_says_why(bundle_dir, tmp_path, http1_port, caplog):
    arr = tmp_path / "x.npy"
    import numpy as np

    np.save(arr, np.zeros((1, 28, 28), dtype=np.float32))
    res = CliRunner().invoke(edge_app, ["classify", str(arr), "--bundle", str(bundle_dir), "--server",
                                        f"127.0.0.1:{http1_port}"])
    assert res.exit_code == 1 and not res.stdout.strip()
    assert "not with gRPC" in res.stderr and "--allow-degraded" in res.stderr
    assert not [r for r in caplog.records if "retry in" in r.getMessage()]


# ---------------------------------------------------------------------------------------- 9: signals


def test_link_probes_are_counted_apart_from_inference_errors(bundle_dir, tmp_path, free_port):
    server = start_server(bundle_dir, free_port(), free_port(), tmp_path / "server.log")
    try:
        with CloudClient(server.address, "default") as c:
            for _ in range(3):
                c.probe_transfer(32 * 1024)
            c.check_ready()
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        server.stop()
    assert re.search(r'^splitinfer_server_link_probes_total\{code="OK"\} 3\.0$', text, flags=re.M), text
    assert re.search(r"^splitinfer_server_link_probe_bytes_total \d{5,}", text, flags=re.M)
    assert 'model="unknown"' not in text and "NOT_FOUND" not in text


def test_busy_ports_are_named(bundle_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        edge = _cli("edge", "run", "--bundle", str(bundle_dir), "--server", "127.0.0.1:1", "--port", str(port))
        assert edge.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in edge.stderr
        assert "--port" in edge.stderr and "edge agent ready" not in edge.stderr
        cloud = _cli("cloud", "serve", "--bundle", str(bundle_dir), "--port", "0", "--metrics-port", str(port))
    assert cloud.returncode == 2
    log = cloud.stdout + cloud.stderr
    assert f"127.0.0.1:{port} (--metrics-port)" in log, log


def test_corrupt_bundle_is_not_reported_loaded(bundle_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    proc = _cli("cloud", "serve", "--bundle", str(broken), "--port", "0", "--metrics-port", "0")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "cannot load model" in log
    assert "model loaded" not in log and "Traceback" not in log


def test_status_cell_is_the_planned_link(bundle_dir):
    from edge_agent.runtime import EdgeRuntime
    from edge_agent.settings import EdgeSettings
    from splitinfer.bundle import OperatingPoint, load_bundle

    bundle = load_bundle(bundle_dir)
    split, codec = bundle.plan.split, bundle.plan.codec.name
    points = [OperatingPoint(bandwidth_bps=bw, rtt_ms=rtt, split=split, codec=codec, exits=[],
                             expected_latency_ms=1.0, expected_bytes=1.0)
              for bw in (0.5e6, 5e6, 50e6) for rtt in (5.0, 20.0, 100.0)]
    bundle.plan = bundle.plan.model_copy(update={"operating_points": points, "active_exits": [],
                                                 "notes": {**bundle.plan.notes, "bandwidth_bps": 5e6,
                                                           "rtt_ms": 20.0}})

    rt = EdgeRuntime(bundle, FakeClient(bundle), EdgeSettings(bundle=bundle_dir, server="127.0.0.1:1"))
    try:
        assert rt.status()["adaptive"]["cell"] == {"bandwidth_bps": 5e6, "rtt_ms": 20.0}
    finally:
        rt.close()


def test_demo_summary_names_only_active_exits_and_the_codec_outside_the_bound():
    from splitinfer.cli.demo import format_summary

    s = {"requests": 10, "split": 6, "codec": "bottleneck", "accuracy": 0.9, "agreement": 0.96,
         "exit_rate": {"per_exit": {"6": 0.5}, "total": 0.5}, "offloaded": 5, "degraded": 0,
         "bytes_per_offloaded": 100.0, "feature_bytes_fp32": 37632, "energy_j_per_request": 0.001,
         "latency_ms": {}, "codec_validation_agreement": 0.965,
         "exit_calibration": {"mode": "certified", "score": "max_softmax", "epsilon": 0.01, "delta": 0.05,
                              "validation_exit_rates": {"6": 0.43}, "inactive_exits": [3]}}
    text = format_summary(s)
    assert "exit@3" not in text and "exit@6: 50.0%" in text and "[3] (not in the chosen exit subset)" in text
    assert "bottleneck codec is outside that bound" in text and "0.9650" in text


# ---------------------------------------------------------------------------------------- 2: random weights


def test_torchvision_without_checkpoint_says_random_weights(tmp_path, caplog):
    res = CliRunner().invoke(plan_app, ["make", "--model", "resnet18", "--out", str(tmp_path / "r18"),
                                        "--repeats", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "resnet18 has random weights (no --checkpoint)" in res.stderr
    assert "accuracy not measured (random weights)" in res.stdout and "est. accuracy drop" not in res.stdout
    plan = json.loads((tmp_path / "r18" / "plan.json").read_text())
    assert plan["model"]["weights_source"] == "random"
    assert plan["input"]["labels"][:2] == ["tench", "goldfish"] and len(plan["input"]["labels"]) == 1000
    from splitinfer.bundle import load_bundle

    with caplog.at_level(logging.WARNING, logger="splitinfer.bundle"):
        load_bundle(tmp_path / "r18")
    assert "has random weights" in caplog.text


# ---------------------------------------------------------------------------------------- 12: progress


def test_progress_bars_only_on_a_terminal(tmp_path):
    from splitinfer.progress import progress_bar

    with open(tmp_path / "log.txt", "w") as f:
        for _ in progress_bar(range(100), desc="x", enabled=True, file=f):
            pass
    assert Path(tmp_path / "log.txt").read_text() == ""

    class Tty:
        def __init__(self):
            self.parts = []

        def isatty(self):
            return True

        def write(self, s):
            self.parts.append(s)

        def flush(self):
            pass

    tty = Tty()
    for _ in progress_bar(range(3), desc="x", enabled=True, file=tty):
        pass
    assert any("x" in p for p in tty.parts)


def test_link_change_log_says_what_is_not_measured(bundle_dir, caplog):
    from edge_agent.runtime import EdgeRuntime
    from edge_agent.settings import EdgeSettings
    from splitinfer.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    rt = EdgeRuntime(bundle, FakeClient(bundle), EdgeSettings(bundle=bundle_dir, server="127.0.0.1:1"))
    try:
        for rtt in [0.001] * 10 + [0.1] * 4:  # a step in the RTT, no bandwidth sample at all
            rt.link.observe_rtt(rtt)
        with caplog.at_level(logging.INFO, logger="edge_agent.link"):
            rt.links.publish()
    finally:
        rt.close()
    assert "link change detected: bandwidth not measured yet, RTT" in caplog.text
    assert "0 Mbit/s" not in caplog.text


def test_edge_only_plans_classify_without_a_server_and_watch_exits_when_idle(tmp_path, free_port, caplog):
    import numpy as np

    from splitinfer.bundle import read_plan
    from tests.support.bundles import make_test_bundle

    probe = make_test_bundle(tmp_path / "probe")
    n = len(read_plan(probe).stages)
    bundle = make_test_bundle(tmp_path / "edge-only", split=n)
    arr = tmp_path / "x.npy"
    np.save(arr, np.zeros((1, 28, 28), dtype=np.float32))
    dead = f"127.0.0.1:{free_port()}"
    res = CliRunner().invoke(edge_app, ["classify", str(arr), "--bundle", str(bundle), "--server", dead])
    assert res.exit_code == 0, res.output  # the plan never calls the server: nothing to refuse
    (answer,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert answer["degraded"] is False and "not reachable" not in res.stderr

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    np.save(inbox / "a.npy", np.zeros((1, 28, 28), dtype=np.float32))
    os.utime(inbox / "a.npy", (0, 0))  # settled long ago
    out = tmp_path / "results.jsonl"
    res = CliRunner().invoke(edge_app, ["watch", str(inbox), "--out", str(out), "--bundle", str(bundle),
                                        "--server", dead, "--interval-s", "0.05", "--exit-when-idle", "0.5"])
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["file"] for line in out.read_text().splitlines()] == [str(inbox / "a.npy")]
