"""splitinfer.daemons: free ports, starting a child process and waiting until it answers, stopping it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from splitinfer.daemons import Daemon, DaemonError, free_port, grpc_health_status, http_ok, tcp_open, wait_until

HTTP_SERVER = ("import http.server, sys; print('listening', flush=True); "
               "http.server.test(http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')")


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_http_ready_then_stop(tmp_path):
    port = free_port()
    with Daemon([sys.executable, "-c", HTTP_SERVER, str(port)], name="http", log_path=tmp_path / "http.log",
                cwd=tmp_path) as d:
        d.wait_http_ready(f"http://127.0.0.1:{port}/", timeout=30)
        assert d.alive() and http_ok(f"http://127.0.0.1:{port}/") and tcp_open(port)
        d.wait_tcp_ready(port, timeout=5)
        assert "listening" in d.log_tail()
    assert not d.alive() and d.returncode is not None


def test_a_daemon_that_exits_fails_the_wait_at_once_with_its_log(tmp_path):
    d = Daemon([sys.executable, "-c", "import sys; print('no bundle here', flush=True); sys.exit(3)"],
               name="cloud server", log_path=tmp_path / "x.log")
    t0 = time.monotonic()
    with pytest.raises(DaemonError) as err:
        d.wait_grpc_ready(f"127.0.0.1:{free_port()}", timeout=60)
    assert time.monotonic() - t0 < 30
    assert err.value.headline == "cloud server exited with code 3 before it was healthy"
    assert "no bundle here" in err.value.log_tail and "no bundle here" in str(err.value)
    assert d.stop() == 3


def test_a_daemon_that_never_answers_times_out(tmp_path):
    d = Daemon([sys.executable, "-c", "import time; time.sleep(60)"], name="sleeper", log_path=tmp_path / "s.log",
               append=False)
    try:
        url = f"http://127.0.0.1:{free_port()}/readyz"
        with pytest.raises(DaemonError, match=r"did not become ready within 1 s"):
            d.wait_http_ready(url, timeout=1.0)
        assert d.alive()  # a timeout leaves the process to the caller
    finally:
        assert d.stop() == -signal.SIGTERM


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    d = Daemon([sys.executable, "-c", code], log_path=tmp_path / "stubborn.log", new_session=True, stop_timeout=0.5)
    assert wait_until(lambda: "up" in d.log(), d.alive, timeout=30) == "ready"
    assert d.stop() == -signal.SIGKILL


def test_health_status_of_nothing_listening_is_none():
    assert grpc_health_status(f"127.0.0.1:{free_port()}", timeout=0.5) is None
    assert wait_until(lambda: False, timeout=0.3, interval=0.1) == "timeout"
    assert wait_until(lambda: True, alive=lambda: False) == "exited"


def test_the_module_imports_no_torch_grpc_or_httpx():
    code = "import sys, splitinfer.daemons; print(sorted(m for m in ('torch', 'grpc', 'httpx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
