"""The cloud server for production, as separate processes on loopback: model repository, streaming, batching,
bearer tokens, per-client limits, TLS and mutual TLS, drain on SIGTERM under load, replica failover."""

from __future__ import annotations

import re
import shutil
import signal
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_agent.replicas import CircuitBreaker, ReplicaSet
from edge_agent.transport import CloudClient, channel_credentials
from splitinfer import wire
from splitinfer.bundle import load_bundle
from splitinfer.codec import get_codec
from splitinfer.errors import Unavailable
from splitinfer.protocol import converters
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.certs import make_certificates
from tests.support.servers import ServerProcess, spawn_server

pytestmark = pytest.mark.slow  # a dozen servers: TLS, drains, replicas (about a minute)

MODEL = "default"
SPLIT = 9
CODEC = "uint8-affine"
TOKEN = "edge-device-token-0123456789"
OTHER_TOKEN = "second-device-token-987654321"


def spawn(port: int, log_path: Path, env: dict[str, str], bundle: Path | None = None, metrics_port: int = 0,
          health_credentials: grpc.ChannelCredentials | None = None) -> ServerProcess:
    """``python -m cloud_server serve`` with 1 torch thread and ``SPLITINFER_CLOUD_*`` env, once it is SERVING
    (checked over TLS with ``health_credentials``); ``stop()`` waits up to 60 s for a drain."""
    return spawn_server(port, log_path, bundle=bundle, metrics_port=metrics_port,
                        env={"SPLITINFER_CLOUD_TORCH_THREADS": "1", **env}, credentials=health_credentials,
                        options=[("grpc.ssl_target_name_override", "localhost")] if health_credentials else (),
                        name="server", stop_timeout=60)


@pytest.fixture(scope="module")
def sample(bundle_dir):
    bundle = load_bundle(bundle_dir)
    torch.manual_seed(3)
    x = torch.randn(1, 1, 28, 28)
    with torch.inference_mode():
        h = bundle.staged.run(x, 0, SPLIT)
    payload, meta = get_codec(CODEC).encode(h)
    decoded = get_codec(CODEC).decode(payload, meta)
    with torch.inference_mode():
        tail = bundle.staged.run(decoded, SPLIT, bundle.staged.num_stages).numpy()
    return {"payload": payload, "meta": meta, "tail": tail, "x": x.numpy()}


def features_request(sample, request_id: str = "", version: str = "", model: str = MODEL) -> pb.ModelInferRequest:
    params = {wire.PARAM_SPLIT: SPLIT, wire.PARAM_CODEC: CODEC,
              **{wire.CODEC_META_PREFIX + k: v for k, v in sample["meta"].items()}}
    tensor = converters.InferTensor(wire.FEATURES_TENSOR, "UINT8", np.frombuffer(sample["payload"], np.uint8))
    return converters.request_to_proto(converters.InferRequest(
        model_name=model, model_version=version, id=request_id, parameters=params, inputs=[tensor]))


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    return converters.response_from_proto(response).outputs[0].data


# ------------------------------------------------------------------------------------------ repository


def test_model_repository_versions_index_unload_and_load(bundle_dir, tmp_path, free_port, sample):
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(bundle_dir, repo / MODEL / version)
    shutil.copytree(bundle_dir, repo / "other" / "1")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "plan.json").write_text("{ not json")
    server = spawn(free_port(), tmp_path / "server.log", {"SPLITINFER_CLOUD_MODEL_REPOSITORY": str(repo)})
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = {(m.name, m.version): (m.state, m.reason)
                     for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
            assert index[(MODEL, "1")][0] == index[(MODEL, "2")][0] == index[("other", "1")][0] == "READY"
            assert index[("broken", "1")][0] == "UNAVAILABLE" and "JSON" in index[("broken", "1")][1]
            ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10).models
            assert {m.name for m in ready_only} == {MODEL, "other"}

            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
            assert list(meta.versions) == ["1", "2"]
            latest = stub.ModelInfer(features_request(sample), timeout=10)
            assert latest.model_version == "2"
            np.testing.assert_allclose(logits_of(latest), sample["tail"], rtol=1e-5, atol=1e-5)
            assert stub.ModelInfer(features_request(sample, version="1"), timeout=10).model_version == "1"
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(features_request(sample, version="7"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="other"), timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(features_request(sample, model="other"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert not stub.ModelReady(pb.ModelReadyRequest(name="other"), timeout=10).ready
            index = {(m.name, m.version): m.state
                     for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
            assert index[("other", "1")] == "UNLOADED"
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

            assert status("other") == health_pb2.HealthCheckResponse.NOT_SERVING  # unloaded
            assert status("broken") == health_pb2.HealthCheckResponse.NOT_SERVING  # never loaded
            assert status(MODEL) == health_pb2.HealthCheckResponse.SERVING

            shutil.copytree(bundle_dir, repo / "other" / "3")  # a new version appears on disk
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="other"), timeout=60)
            answer = stub.ModelInfer(features_request(sample, model="other"), timeout=10)
            assert answer.model_name == "other" and answer.model_version == "3"
            assert status("other") == health_pb2.HealthCheckResponse.SERVING  # loaded again
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="missing"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "JSON" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:  # Triton's config/file overrides are not supported
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
                    model_name=MODEL, parameters={"config": pb.ModelRepositoryParameter(string_param="{}")}),
                    timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            # A reload whose version 2 is now corrupt keeps serving the previous copy of version 2.
            (repo / MODEL / "2" / "plan.json").write_text("{ corrupt")
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "still serving the previous copy of 2" in err.value.details()
            answer = stub.ModelInfer(features_request(sample, version="2"), timeout=10)
            np.testing.assert_allclose(logits_of(answer), sample["tail"], rtol=1e-5, atol=1e-5)
    finally:
        assert server.stop() == 0, server.log()


# ---------------------------------------------------------------------------------- streaming, batching


def test_model_stream_infer_answers_every_request_once_and_errors_in_band(bundle_dir, tmp_path, free_port,
                                                                          sample):
    server = spawn(free_port(), tmp_path / "server.log", {"SPLITINFER_CLOUD_BATCH_MAX_DELAY_MS": "5"},
                   bundle=bundle_dir)
    try:
        requests = [features_request(sample, request_id=f"r{i}") for i in range(40)]
        bad = features_request(sample, request_id="bad")
        bad.parameters[wire.PARAM_SPLIT].int64_param = 999
        requests.insert(17, bad)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            responses = list(stub.ModelStreamInfer(iter(requests), timeout=60))
        ids = Counter(r.infer_response.id for r in responses)
        assert ids == Counter(r.id for r in requests)  # each request answered exactly once
        by_id = {r.infer_response.id: r for r in responses}
        bad_answer = by_id["bad"].error_message
        assert bad_answer.startswith("INVALID_ARGUMENT") and "out of range" in bad_answer
        for i in range(40):
            r = by_id[f"r{i}"]
            assert r.error_message == ""
            np.testing.assert_allclose(logits_of(r.infer_response), sample["tail"], rtol=1e-5, atol=1e-5)

        # A frame that does not parse: the requests before it are answered, then the stream ends
        # INVALID_ARGUMENT (it does not hang).
        good = features_request(sample, request_id="before").SerializeToString()
        with grpc.insecure_channel(server.address) as channel:
            raw = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                        request_serializer=lambda b: b,
                                        response_deserializer=pb.ModelStreamInferResponse.FromString)
            call = raw(iter([good, b"\xff\xff\xff not a protobuf"]), timeout=30)
            got = []
            with pytest.raises(grpc.RpcError) as err:
                for response in call:
                    got.append(response.infer_response.id)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and got == ["before"]
    finally:
        assert server.stop() == 0, server.log()


def test_concurrent_requests_are_batched(bundle_dir, tmp_path, free_port, sample):
    metrics_port = free_port()
    server = spawn(free_port(), tmp_path / "server.log", {"SPLITINFER_CLOUD_BATCH_MAX_DELAY_MS": "20",
                                                        "SPLITINFER_CLOUD_WORKERS": "1"},
                   bundle=bundle_dir, metrics_port=metrics_port)
    try:
        client = CloudClient(server.address, MODEL, timeout_s=30)
        results: list[np.ndarray] = []

        def worker() -> None:
            for _ in range(10):
                results.append(client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC).logits)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
        assert len(results) == 80
        for logits in results:  # batching never mixes up rows
            np.testing.assert_allclose(logits, sample["tail"], rtol=1e-4, atol=1e-4)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        runs = float(re.search(r'splitinfer_server_batch_size_count\{model="default"\} (\S+)', text).group(1))
        samples = float(re.search(r'splitinfer_server_batch_size_sum\{model="default"\} (\S+)', text).group(1))
        assert samples == 80 and runs < 80, (runs, samples)  # fewer tail runs than requests
    finally:
        assert server.stop() == 0, server.log()


# ----------------------------------------------------------------------------- tokens and client limits


def test_bearer_tokens_and_per_client_limits(bundle_dir, tmp_path, free_port, sample):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# edge devices\ndevice-a:{TOKEN}\ndevice-b:{OTHER_TOKEN}\n")
    server = spawn(free_port(), tmp_path / "server.log", {
        "SPLITINFER_CLOUD_AUTH_TOKENS_FILE": str(tokens), "SPLITINFER_CLOUD_MAX_CONCURRENCY_PER_CLIENT": "1",
        "SPLITINFER_CLOUD_WORKERS": "1"}, bundle=bundle_dir)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for metadata in (None, (("authorization", "Bearer wrong-token-wrong-token"),),
                             (("authorization", TOKEN),)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(features_request(sample), timeout=10, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token

            a = (("authorization", f"Bearer {TOKEN}"),)
            b = (("authorization", f"Bearer {OTHER_TOKEN}"),)
            # 20 requests of device-a at once with a limit of 1: while one runs the others are refused.
            burst = [stub.ModelInfer.future(features_request(sample), timeout=10, metadata=a) for _ in range(20)]
            other = stub.ModelInfer(features_request(sample), timeout=10, metadata=b)  # another client is fine
            codes = Counter()
            for future in burst:
                try:
                    np.testing.assert_allclose(logits_of(future.result()), sample["tail"], rtol=1e-5, atol=1e-5)
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "device-a" in exc.details()
                    codes["RESOURCE_EXHAUSTED"] += 1
            assert codes["OK"] >= 1 and codes["RESOURCE_EXHAUSTED"] >= 1, codes
            np.testing.assert_allclose(logits_of(other), sample["tail"], rtol=1e-5, atol=1e-5)
        with CloudClient(server.address, MODEL, timeout_s=10, token=TOKEN) as client:  # the edge's own client
            np.testing.assert_allclose(client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC).logits,
                                       sample["tail"], rtol=1e-5, atol=1e-5)
    finally:
        assert server.stop() == 0, server.log()


# ------------------------------------------------------------------------------------------ TLS / mTLS


def test_mutual_tls_refuses_clients_without_a_valid_certificate_and_plaintext(bundle_dir, tmp_path, free_port,
                                                                               sample):
    certs = make_certificates(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"device-a:{TOKEN}\n")
    good = channel_credentials(certs["ca"], certs["client"], tmp_path / "client.key")
    server = spawn(free_port(), tmp_path / "server.log", {
        "SPLITINFER_CLOUD_TLS_CERT": str(certs["server"]), "SPLITINFER_CLOUD_TLS_KEY": str(tmp_path / "server.key"),
        "SPLITINFER_CLOUD_TLS_CLIENT_CA": str(certs["ca"]), "SPLITINFER_CLOUD_AUTH_TOKENS_FILE": str(tokens)},
        bundle=bundle_dir, health_credentials=good)
    try:
        with CloudClient(server.address, MODEL, timeout_s=10, credentials=good, token=TOKEN) as client:
            np.testing.assert_allclose(client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC).logits,
                                       sample["tail"], rtol=1e-5, atol=1e-5)
        with CloudClient(server.address, MODEL, timeout_s=10, credentials=good) as client, \
                pytest.raises(Exception, match="UNAUTHENTICATED|missing 'authorization"):
            client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)

        refused = {
            "no client certificate": channel_credentials(certs["ca"]),
            "certificate of another CA": channel_credentials(certs["ca"], certs["rogue"], tmp_path / "rogue.key"),
        }
        for what, credentials in refused.items():
            with CloudClient(server.address, MODEL, timeout_s=5, credentials=credentials, token=TOKEN) as client:
                with pytest.raises(Unavailable):
                    client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
                assert not client.server_ready(), what
        with CloudClient(server.address, MODEL, timeout_s=5, token=TOKEN) as plaintext, pytest.raises(Unavailable):
            plaintext.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
        assert "mutual_tls" in server.log() and '"mutual_tls": true' in server.log()
    finally:
        assert server.stop() == 0, server.log()


# ------------------------------------------------------------------------------------------ lifecycle


def _sigterm_under_load(bundle_dir, log_path, port: int, sample) -> tuple[int, str, list[str]]:
    """Eight clients hammer a fresh server; after 100 answers it gets SIGTERM. Returns its exit code, its log and
    every request's outcome ("ok", "refused" or "LOST <code>: <details>")."""
    # Inline runs off: a request run on the event loop is always finished before the loop handles the signal,
    # so it can never be the in-flight request a drain must wait for; the worker path is what this exercises.
    server = spawn(port, log_path, {"SPLITINFER_CLOUD_BATCH_MAX_DELAY_MS": "30", "SPLITINFER_CLOUD_WORKERS": "1",
                                    "SPLITINFER_CLOUD_INLINE_COMPUTE_MAX_MS": "0", "SPLITINFER_CLOUD_GRACE_S": "20"},
                   bundle=bundle_dir)
    outcomes: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    refused = re.compile(r"shutting down|failed to connect|Connection refused|connection attempt timed out")

    def worker() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    r = stub.ModelInfer(features_request(sample), timeout=30)
                    np.testing.assert_allclose(logits_of(r), sample["tail"], rtol=1e-5, atol=1e-5)
                    outcome = "ok"
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                    outcome = "refused" if code == grpc.StatusCode.UNAVAILABLE and refused.search(details) else (
                        f"LOST {code.name}: {details}")
                with lock:
                    outcomes.append(outcome)
                if outcome == "refused":
                    time.sleep(0.01)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    while len(outcomes) < 100:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return code, server.log(), outcomes


def test_sigterm_under_load_answers_every_accepted_request(bundle_dir, tmp_path, free_port, sample):
    # The drain must meet requests in flight for the test to mean anything. Eight clients nearly always keep some
    # in flight, but on a loaded machine the signal once landed between two waves (inflight 0: CI, 2026-12-03);
    # such a run still has to answer everything, and the scenario is repeated until one drains in-flight work.
    drained_inflight = []
    for attempt in range(4):
        code, log, outcomes = _sigterm_under_load(bundle_dir, tmp_path / f"server{attempt}.log", free_port(), sample)
        assert code == 0, log
        counts = Counter(outcomes)
        drained = re.search(r'"msg": "draining".*?"inflight": (\d+)', log)
        assert drained, log
        stopped = re.search(r'"msg": "stopped".*?"unanswered": (\d+), "admitted": (\d+), "completed": (\d+)', log)
        assert stopped, log
        unanswered, admitted, completed = map(int, stopped.groups())
        # Every request the server admitted was answered with its result, and the clients got exactly those:
        assert unanswered == 0 and admitted == completed == counts["ok"], (stopped.groups(), counts)
        # Anything else was refused before admission (UNAVAILABLE while draining, or the transport refusing new
        # calls as it closes: CANCELLED/UNAVAILABLE), which a client may safely retry elsewhere.
        others = {o for o in outcomes if o.startswith("LOST")}
        assert all(o.startswith(("LOST CANCELLED", "LOST UNAVAILABLE")) for o in others), others
        assert counts["ok"] >= 100
        drained_inflight.append(int(drained.group(1)))
        if drained_inflight[-1] > 0:
            break
    assert drained_inflight[-1] > 0, drained_inflight  # some run had requests in flight when the signal came


# -------------------------------------------------------------------------------------------- replicas


def test_edge_client_survives_one_of_three_replicas_killed_mid_run(bundle_dir, tmp_path, free_port, sample):
    servers = [spawn(free_port(), tmp_path / f"replica{i}.log", {}, bundle=bundle_dir) for i in range(3)]
    clients = [CloudClient(s.address, MODEL, timeout_s=5) for s in servers]
    replicas = ReplicaSet(clients, timeout_s=5, backoff_s=0.01, breaker=lambda: CircuitBreaker(2, 0.5, 5.0))
    answered: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(1000))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            if i == 300:
                servers[1].proc.send_signal(signal.SIGKILL)
            try:
                logits = replicas.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC, f"r{i}").logits
                np.testing.assert_allclose(logits, sample["tail"], rtol=1e-5, atol=1e-5)
                with lock:
                    answered.append(f"r{i}")
            except Exception as exc:  # noqa: BLE001 - every failure is a test failure, collected
                with lock:
                    errors.append(f"r{i}: {exc}")

    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[:5]
        assert len(answered) == len(set(answered)) == 1000
        state = {r["address"]: r for r in replicas.snapshot()}
        assert state[servers[1].address]["failures"] >= 1 and state[servers[1].address]["state"] != "closed"
        assert replicas.retries >= 1
        assert state[servers[0].address]["calls"] > 300 and state[servers[2].address]["calls"] > 300
    finally:
        replicas.close()
        for s in servers:
            s.stop(signal.SIGKILL)


# ------------------------------------------------------------------------------------ cloud-only images


def test_image_codec_gives_cloud_only_inference_from_png_and_refuses_bad_images(bundle_dir, tmp_path, free_port):
    import io

    from PIL import Image

    from splitinfer.errors import InvalidInput
    from splitinfer.imaging import ImageCodec, decode_image

    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    png, meta = ImageCodec(bundle.plan.input).encode(pixels)
    assert meta == {"format": "png"} and png.startswith(b"\x89PNG")
    x = torch.from_numpy(decode_image(png, bundle.plan.input))
    with torch.inference_mode():
        expected = bundle.staged.run(x, 0, bundle.staged.num_stages).numpy()
    huge = io.BytesIO()
    Image.new("L", (5000, 5000)).save(huge, format="PNG")  # 25 M pixels: above the limit, refused before decoding
    server = spawn(free_port(), tmp_path / "server.log", {}, bundle=bundle_dir)
    try:
        with CloudClient(server.address, MODEL, timeout_s=10) as client:
            got = client.infer_features(png, meta, 0, "image").logits
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
            for payload, params, split, match in [
                (png, meta, SPLIT, "split must be 0"),
                (b"\x89PNG\r\n\x1a\n garbage", meta, 0, "not an image|cannot"),
                (png, {"format": "jpeg"}, 0, "not the declared jpeg"),
                (huge.getvalue(), meta, 0, "too large"),
            ]:
                with pytest.raises(InvalidInput, match=match):
                    client.infer_features(payload, params, split, "image")
    finally:
        assert server.stop() == 0, server.log()


# ------------------------------------------------------------------------------- the edge's stream client


def test_edge_stream_client_multiplexes_reconnects_and_never_drops_a_request(bundle_dir, tmp_path, free_port,
                                                                             sample):
    from splitinfer.errors import InvalidInput

    port = free_port()
    server = spawn(port, tmp_path / "first.log", {}, bundle=bundle_dir)
    client = CloudClient(server.address, MODEL, timeout_s=10, stream=True)
    try:
        results: list[np.ndarray] = []

        def worker() -> None:
            for _ in range(25):
                results.append(client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC).logits)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 100 and client._stream.streams_opened == 1  # one stream carried them all
        for logits in results:
            np.testing.assert_allclose(logits, sample["tail"], rtol=1e-5, atol=1e-5)
        with pytest.raises(InvalidInput, match="out of range"):  # an error in band, the stream stays usable
            client.infer_features(sample["payload"], sample["meta"], 999, CODEC)
        client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
        assert client._stream.streams_opened == 1

        server.stop(signal.SIGKILL)  # the stream breaks: calls fail fast as Unavailable, none hangs or vanishes
        with pytest.raises(Unavailable):
            client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
        server = spawn(port, tmp_path / "second.log", {}, bundle=bundle_dir)
        deadline = time.monotonic() + 30
        while True:
            try:
                got = client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC).logits
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the stream never reconnected"
                time.sleep(0.2)
        np.testing.assert_allclose(got, sample["tail"], rtol=1e-5, atol=1e-5)
        assert client._stream.streams_opened >= 2
    finally:
        client.close()
        server.stop()


def test_streaming_replicas_survive_a_drain_without_losing_requests(bundle_dir, tmp_path, free_port, sample):
    servers = [spawn(free_port(), tmp_path / f"r{i}.log", {"SPLITINFER_CLOUD_BATCH_MAX_DELAY_MS": "10"},
                     bundle=bundle_dir) for i in range(2)]
    replicas = ReplicaSet([CloudClient(s.address, MODEL, timeout_s=10, stream=True) for s in servers],
                          timeout_s=10, backoff_s=0.01)
    answered, errors = [], []
    lock = threading.Lock()
    counter = iter(range(400))

    def worker() -> None:
        while (i := next(counter, None)) is not None:
            if i == 150:
                servers[0].proc.send_signal(signal.SIGTERM)  # drains: its stream ends after pending answers
            try:
                logits = replicas.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC).logits
                np.testing.assert_allclose(logits, sample["tail"], rtol=1e-5, atol=1e-5)
                with lock:
                    answered.append(i)
            except Exception as exc:  # noqa: BLE001 - collected: every failure fails the test
                with lock:
                    errors.append(f"{i}: {exc}")

    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[:5]
        assert sorted(answered) == list(range(400))
        assert servers[0].proc.wait(timeout=60) == 0, servers[0].log()
        assert '"unanswered": 0' in servers[0].log()
    finally:
        replicas.close()
        for s in servers:
            s.stop()
