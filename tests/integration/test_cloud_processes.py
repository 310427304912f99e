"""``splitinfer cloud serve --processes 2``: worker processes sharing one port under a supervisor, as real
processes on loopback: answers from every connection, summed metrics, model control refused, a clean drain on
SIGTERM, and a supervisor that stops everything when a worker dies."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.multiprocess import MultiProcessCollector

from cloud_server.processes import reserve_port
from edge_agent.transport import CloudClient
from splitinfer import wire
from splitinfer.bundle import load_bundle
from splitinfer.codec import get_codec
from splitinfer.protocol import converters
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.support.servers import spawn_server

MODEL = "default"
SPLIT = 9
CODEC = "uint8-affine"


@pytest.fixture(scope="module")
def sample(bundle_dir):
    bundle = load_bundle(bundle_dir)
    torch.manual_seed(5)
    with torch.inference_mode():
        h = bundle.staged.run(torch.randn(1, 1, 28, 28), 0, SPLIT)
    payload, meta = get_codec(CODEC).encode(h)
    with torch.inference_mode():
        tail = bundle.staged.run(get_codec(CODEC).decode(payload, meta), SPLIT, bundle.staged.num_stages).numpy()
    return payload, meta, tail


def _spawn(bundle_dir, tmp_path, free_port, name: str, metrics_port: int = 0):
    return spawn_server(free_port(), tmp_path / f"{name}.log", bundle=bundle_dir, metrics_port=metrics_port,
                        env={"SPLITINFER_CLOUD_PROCESSES": "2", "SPLITINFER_CLOUD_TORCH_THREADS": "1",
                             "SPLITINFER_CLOUD_GRACE_S": "2"}, stop_timeout=60)


def _worker_pids(log: str) -> list[int]:
    ready = [json.loads(line) for line in log.splitlines() if '"msg": "cloud server ready"' in line]
    assert ready, log
    return ready[-1]["pids"]


def _answered(pid: int) -> float:
    """Requests answered OK by one worker process, from the files it writes its metrics to."""
    text = Path(f"/proc/{pid}/environ").read_text()
    environ = dict(item.split("=", 1) for item in text.split("\0") if "=" in item)
    files = [os.path.join(environ["PROMETHEUS_MULTIPROC_DIR"], f"counter_{pid}.db")]
    for metric in MultiProcessCollector.merge(files, accumulate=True):
        for sample in metric.samples:
            if sample.name == "splitinfer_server_requests_total" and sample.labels.get("code") == "OK":
                return sample.value
    return 0.0


def _wait_all_ready(server, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while '"msg": "cloud server ready"' not in server.log():
        assert server.alive() and time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    return _worker_pids(server.log())


def test_two_processes_answer_every_connection_sum_metrics_refuse_model_control_and_drain(
        bundle_dir, tmp_path, free_port, sample):
    payload, meta, reference = sample
    metrics_port = free_port()
    server = _spawn(bundle_dir, tmp_path, free_port, "server", metrics_port)
    try:
        pids = _wait_all_ready(server)
        assert len(pids) == 2 and server.pid not in pids
        # the edge's own client answers the same through the supervisor's port
        with CloudClient(server.address, MODEL, timeout_s=30) as client:
            res = client.infer_features(payload, meta, SPLIT, CODEC)
        np.testing.assert_allclose(res.logits, reference, rtol=1e-4, atol=1e-5)
        # one connection per client, as separate devices have (a local subchannel pool: channels of one process
        # would otherwise share a connection): the kernel spreads connections over the processes
        request = converters.request_to_proto(converters.InferRequest(
            model_name=MODEL, model_version="", id="", inputs=[converters.InferTensor(
                wire.FEATURES_TENSOR, "UINT8", np.frombuffer(payload, np.uint8))],
            parameters={wire.PARAM_SPLIT: SPLIT, wire.PARAM_CODEC: CODEC,
                        **{wire.CODEC_META_PREFIX + k: v for k, v in meta.items()}}))
        for _ in range(11):
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                answer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
            np.testing.assert_allclose(converters.response_from_proto(answer).outputs[0].data, reference,
                                       rtol=1e-4, atol=1e-5)
        # every process's connections were answered: the supervisor's /metrics sums all of them
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        ok = re.search(r'splitinfer_server_requests_total\{code="OK",model="default"\} (\S+)', text)
        assert ok and float(ok.group(1)) == 12.0, text
        per_process = [_answered(pid) for pid in pids]  # and both processes served some of them
        assert sum(per_process) == 12 and min(per_process) > 0, per_process
        # loading or unloading would change one process's models only: refused, with the reason
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--processes" in err.value.details()
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    finally:
        code = server.stop(signal.SIGTERM)
    log = server.log()
    assert code == 0, log
    stopped = [json.loads(line) for line in log.splitlines() if '"msg": "stopped"' in line and '"processes"' in line]
    assert stopped and stopped[-1]["exit_codes"] == [0, 0], log
    for pid in pids:  # the workers are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_dead_worker_stops_the_server_with_an_error(bundle_dir, tmp_path, free_port):
    server = _spawn(bundle_dir, tmp_path, free_port, "dying")
    try:
        pids = _wait_all_ready(server)
        os.kill(pids[0], signal.SIGKILL)
        server.proc.wait(timeout=60)
    finally:
        server.stop()
    log = server.log()
    assert server.returncode == 1, log
    assert "a worker process exited on its own" in log
    with pytest.raises(ProcessLookupError):
        os.kill(pids[1], 0)


def test_reserving_a_port_another_program_listens_on_fails_clearly():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="cannot bind the gRPC port"):
            reserve_port("127.0.0.1", port)
    with reserve_port("127.0.0.1", 0) as sock:  # port 0: a free port, held
        assert sock.getsockname()[1] > 0
