"""The real cloud server, started as a separate process on loopback (``python -m cloud_server serve``)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from edge_agent.transport import CloudClient
from splitinfer import wire
from splitinfer.bundle import load_bundle
from splitinfer.codec import get_codec
from splitinfer.errors import InvalidInput, NotFound, Unavailable
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.support.servers import MAX_BATCH, ServerProcess, free_port, grpc_health_status, spawn_server, start_server

MODEL = "default"
SPLIT = 9  # boundary [96, 7, 7] of the test bundle
CODEC = "uint8-affine"


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server for the module."""
    proc = start_server(bundle_dir, free_port(), free_port(), tmp_path_factory.mktemp("cloud") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def client(server) -> Iterator[CloudClient]:
    c = CloudClient(server.address, MODEL, timeout_s=10.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def sample(bundle) -> dict:
    """A batch of 2 inputs, its features at SPLIT encoded with uint8-affine, and reference logits."""
    torch.manual_seed(1)
    x = torch.randn(2, *bundle.plan.input.shape)
    codec = get_codec(CODEC)
    with torch.inference_mode():
        head = bundle.staged.run(x, 0, SPLIT)
        payload, meta = codec.encode(head)
        decoded = codec.decode(payload, meta)
        tail_logits = bundle.staged.run(decoded, SPLIT, bundle.staged.num_stages).numpy()
        exact_tail = bundle.staged.run(head, SPLIT, bundle.staged.num_stages).numpy()
        full = bundle.staged(x).numpy()
    return {"x": x.numpy(), "payload": payload, "meta": meta, "tail": tail_logits, "exact_tail": exact_tail,
            "full": full}


def _infer(stub, msg: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return stub.ModelInfer(msg, timeout=10)


def _features_request(sample, *, split=SPLIT, codec=CODEC, meta=None, payload=None, model=MODEL,
                      datatype="UINT8") -> pb.ModelInferRequest:
    payload = sample["payload"] if payload is None else payload
    meta = sample["meta"] if meta is None else meta
    msg = pb.ModelInferRequest(model_name=model)
    if split is not None:
        msg.parameters[wire.PARAM_SPLIT].int64_param = split
    if codec is not None:
        msg.parameters[wire.PARAM_CODEC].string_param = codec
    for k, v in meta.items():
        msg.parameters[wire.CODEC_META_PREFIX + k].string_param = str(v)
    msg.inputs.add(name=wire.FEATURES_TENSOR, datatype=datatype, shape=[len(payload)])
    msg.raw_input_contents.append(payload)
    return msg


def _input_request(x: np.ndarray, name: str = wire.INPUT_TENSOR, datatype: str = "FP32",
                   dtype: str = "<f4") -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=MODEL)
    msg.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
    msg.raw_input_contents.append(np.ascontiguousarray(x, dtype=dtype).tobytes())
    return msg


# ------------------------------------------------------------------------------------------- health/metadata


def test_health_and_readiness(server, stub):
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=5).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version=wire.MODEL_VERSION), timeout=5).ready
    for service in ("", MODEL, "inference.GRPCInferenceService"):
        assert grpc_health_status(server.address, service) == health_pb2.HealthCheckResponse.SERVING


def test_unknown_model_is_not_found_everywhere(stub):
    for call, req in ((stub.ModelReady, pb.ModelReadyRequest(name="nope")),
                      (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
                      (stub.ModelMetadata, pb.ModelMetadataRequest(name=MODEL, version="7"))):
        with pytest.raises(grpc.RpcError) as err:
            call(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown" in err.value.details()


def test_server_and_model_metadata(stub, bundle):
    smeta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert smeta.name == "splitinfer" and smeta.version
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=5)
    assert meta.name == MODEL and list(meta.versions) == [wire.MODEL_VERSION]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs == {"features": ("UINT8", [-1]), "input": ("FP32", [-1, *bundle.plan.input.shape])}
    (out,) = meta.outputs
    num_classes = bundle.plan.model.num_classes
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [-1, num_classes])


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


# ------------------------------------------------------------------------------------------------- inference


def test_features_request_matches_local_tail(client, sample):
    result = client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC, request_id="r-1")
    assert result.logits.dtype == np.float32 and result.logits.shape == sample["tail"].shape
    np.testing.assert_array_equal(result.logits, sample["tail"])  # same payload decoded locally
    np.testing.assert_allclose(result.logits, sample["exact_tail"], atol=0.5)  # quantization error only
    assert result.bytes_sent > len(sample["payload"]) and result.bytes_received > 0
    assert result.server_compute_ms > 0 and result.server_queue_ms >= 0 and result.round_trip_s > 0


def test_tail_engine_auto_serves_the_same_answers(bundle_dir, tmp_path, sample):
    """--tail-engine auto (env and flag alike): the server logs the engine it chose and why, and answers what
    eager torch answers for the same payload (within the engines' export tolerance)."""
    srv = spawn_server(free_port(), tmp_path / "auto.log", bundle=bundle_dir,
                       env={"SPLITINFER_CLOUD_TAIL_ENGINE": "auto",
                            "SPLITINFER_CLOUD_MAX_REQUEST_BATCH": str(MAX_BATCH)})
    client = CloudClient(srv.address, MODEL, timeout_s=10.0)
    try:
        result = client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
        tolerance = 1e-4 * max(1.0, float(np.abs(sample["tail"]).max()))
        np.testing.assert_allclose(result.logits, sample["tail"], rtol=0, atol=tolerance)
        log = srv.log()
        assert '"msg": "tail engine"' in log and f"is the fastest after split {SPLIT}" in log
    finally:
        client.close()
        assert srv.stop() == 0


def test_response_echoes_id_and_parameters(stub, sample):
    msg = _features_request(sample)
    msg.id = "abc-42"
    resp = _infer(stub, msg)
    assert (resp.model_name, resp.model_version, resp.id) == (MODEL, wire.MODEL_VERSION, "abc-42")
    assert {wire.PARAM_QUEUE_MS, wire.PARAM_COMPUTE_MS} <= set(resp.parameters)
    assert resp.parameters[wire.PARAM_COMPUTE_MS].WhichOneof("parameter_choice") == "double_param"
    (out,) = resp.outputs
    assert out.name == "logits" and out.datatype == "FP32" and list(out.shape) == [2, 10]
    logits = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_array_equal(logits, sample["tail"])


def test_input_request_runs_the_full_model(client, sample):
    result = client.infer_input(sample["x"])
    np.testing.assert_allclose(result.logits, sample["full"], rtol=1e-5, atol=1e-6)


def test_input_request_with_typed_fp32_contents(stub, sample):
    x = sample["x"][:1]
    msg = pb.ModelInferRequest(model_name=MODEL)
    msg.inputs.add(name="input", datatype="FP32", shape=list(x.shape),
                   contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()))
    resp = _infer(stub, msg)
    logits = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(1, 10)
    np.testing.assert_allclose(logits, sample["full"][:1], rtol=1e-5, atol=1e-6)


def test_float32_codec_at_split_zero(client, sample):
    """Any split in 0..N-1 is accepted; split 0 with the float32 codec is lossless cloud-only inference."""
    payload, meta = get_codec("float32").encode(torch.from_numpy(sample["x"]))
    result = client.infer_features(payload, meta, 0, "float32")
    np.testing.assert_allclose(result.logits, sample["full"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- malformed requests


def _with(build: Callable[[pb.ModelInferRequest], None], base: Callable[[dict], pb.ModelInferRequest]):
    def make(sample):
        msg = base(sample)
        build(msg)
        return msg
    return make


def _garbled_scales(sample) -> pb.ModelInferRequest:
    payload = bytearray(sample["payload"])
    payload[0:4] = np.array([np.nan], dtype="<f4").tobytes()
    return _features_request(sample, payload=bytes(payload))


def _both_inputs(sample) -> pb.ModelInferRequest:
    msg = _features_request(sample)
    x = sample["x"]
    msg.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    msg.raw_input_contents.append(x.astype("<f4").tobytes())
    return msg


def _nan_input(sample) -> pb.ModelInferRequest:
    x = sample["x"].copy()
    x[0, 0, 0, 0] = np.nan
    return _input_request(x)


def _split_as_string(sample) -> pb.ModelInferRequest:
    msg = _features_request(sample)
    msg.parameters[wire.PARAM_SPLIT].string_param = "9"
    return msg


def _raw_count_mismatch(sample) -> pb.ModelInferRequest:
    msg = _features_request(sample)
    msg.raw_input_contents.append(b"extra")
    return msg


def _raw_and_typed(sample) -> pb.ModelInferRequest:
    msg = _features_request(sample)
    msg.inputs[0].contents.uint_contents.append(1)
    return msg


def _feature_shape(shape: str):
    def make(sample):
        return _features_request(sample, meta={**sample["meta"], "shape": shape})
    return make


def _typed_count_mismatch(sample) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=MODEL)
    msg.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28],
                   contents=pb.InferTensorContents(fp32_contents=[0.0] * 100))
    return msg


MALFORMED: dict[str, tuple[Callable[[dict], pb.ModelInferRequest], str]] = {
    "features wrong datatype": (lambda s: _features_request(s, datatype="INT8"), "must be UINT8"),
    "features shape vs raw length": (
        _with(lambda m: m.inputs[0].shape.__setitem__(0, 10), _features_request), "oversized raw contents"),
    "truncated payload": (lambda s: _features_request(s, payload=s["payload"][:-3]), "truncated"),
    "oversized payload": (lambda s: _features_request(s, payload=s["payload"] + b"\0"), "oversized"),
    "missing split": (lambda s: _features_request(s, split=None), "'split'"),
    "split out of range": (lambda s: _features_request(s, split=17), "split 17 out of range"),
    "negative split": (lambda s: _features_request(s, split=-1), "split -1 out of range"),
    "split as string": (_split_as_string, "must be an integer"),
    "unknown codec": (lambda s: _features_request(s, codec="zstd-9000"), "unknown codec 'zstd-9000'"),
    "missing codec": (lambda s: _features_request(s, codec=None), "'codec'"),
    "missing codec.shape": (lambda s: _features_request(s, meta={}), "codec shape"),
    "codec.shape not the boundary": (_feature_shape("2,48,14,14"), "does not match boundary 9"),
    "codec.shape wrong split": (lambda s: _features_request(s, split=4), "does not match boundary 4"),
    "codec.shape garbage": (_feature_shape("two,96"), "not a comma-separated list"),
    "garbled non-finite scales": (_garbled_scales, "non-finite"),
    "batch above max_request_batch": (_feature_shape(f"{MAX_BATCH + 1},96,7,7"),
                                      "above this server's max_request_batch"),
    "no inputs": (lambda s: pb.ModelInferRequest(model_name=MODEL), "no inputs"),
    "both inputs": (_both_inputs, "exactly one of"),
    "unknown input name": (lambda s: _input_request(s["x"], name="image"), "unknown input 'image'"),
    "raw contents count mismatch": (_raw_count_mismatch, "raw_input_contents has 2 entries"),
    "raw and typed contents": (_raw_and_typed, "both typed contents and raw"),
    "input wrong datatype": (lambda s: _input_request(s["x"], datatype="FP64", dtype="<f8"), "must be FP32"),
    "input wrong shape": (lambda s: _input_request(s["x"].reshape(2, 28, 28)),
                          "does not match the model input"),
    "input batch above max_request_batch": (lambda s: _input_request(np.zeros((MAX_BATCH + 1, 1, 28, 28), "f4")),
                                            "above this server's max_request_batch"),
    "input NaN": (_nan_input, "NaN or infinite"),
    "typed element count": (_typed_count_mismatch, "100 values in fp32_contents"),
    "negative dimension": (_with(lambda m: m.inputs[0].shape.__setitem__(0, -5), _features_request),
                           "negative dimension"),
    "unsupported datatype": (lambda s: _features_request(s, datatype="BF16"), "unsupported datatype 'BF16'"),
    "unknown requested output": (_with(lambda m: m.outputs.add(name="probs"), _features_request),
                                 "unknown requested output 'probs'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_invalid_argument(stub, sample, case):
    build, message = MALFORMED[case]
    with pytest.raises(grpc.RpcError) as err:
        _infer(stub, build(sample))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details() or ""
    assert details and re.search(message, details), details


def test_unknown_model_request_is_not_found(stub, sample):
    with pytest.raises(grpc.RpcError) as err:
        _infer(stub, _features_request(sample, model="resnet-9000"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "resnet-9000" in err.value.details()


def test_client_maps_status_codes_to_domain_errors(server, sample):
    with CloudClient(server.address, MODEL) as c, pytest.raises(InvalidInput, match="out of range"):
        c.infer_features(sample["payload"], sample["meta"], 99, CODEC)
    with CloudClient(server.address, "nope") as c, pytest.raises(NotFound):
        c.infer_input(sample["x"])


def test_server_survives_malformed_requests(stub, client, sample):
    """Runs after the malformed cases (file order): the server still answers and infers correctly."""
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    result = client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
    np.testing.assert_array_equal(result.logits, sample["tail"])


# --------------------------------------------------------------------------------------------------- metrics

FAMILIES = (
    "splitinfer_server_request_duration_seconds", "splitinfer_server_queue_duration_seconds",
    "splitinfer_server_compute_duration_seconds", "splitinfer_server_batch_size",
    "splitinfer_server_requests_total", "splitinfer_server_inflight_requests",
    "splitinfer_server_request_bytes_total", "splitinfer_server_response_bytes_total",
)


def test_metrics_endpoint(server, client, stub, sample):
    client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
    with pytest.raises(grpc.RpcError):
        _infer(stub, _features_request(sample, split=-1))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in FAMILIES:
        assert f"# TYPE {family} " in text, family
    assert f'splitinfer_server_requests_total{{code="OK",model="{MODEL}"}}' in text
    assert f'splitinfer_server_requests_total{{code="INVALID_ARGUMENT",model="{MODEL}"}}' in text
    assert f'splitinfer_server_batch_size_bucket{{le="2.0",model="{MODEL}"}}' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


# ------------------------------------------------------------------------------------ shutdown and restart


@pytest.mark.slow  # two more servers, a drain and a reconnect (about 14 s)
def test_sigterm_exits_cleanly_and_client_reconnects(bundle_dir, tmp_path, sample):
    """SIGTERM drains and exits 0; the same CloudClient works again once a server is back on the address."""
    port, metrics_port = free_port(), free_port()
    first = start_server(bundle_dir, port, metrics_port, tmp_path / "first.log")
    client = CloudClient(first.address, MODEL, timeout_s=10.0)
    try:
        assert client.server_ready()
        client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=30) == 0, first.log()
        assert '"msg": "stopped"' in first.log()
        assert not client.server_ready()
        with pytest.raises(Unavailable):
            client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)

        second = start_server(bundle_dir, port, metrics_port, tmp_path / "second.log")
        try:
            deadline = time.monotonic() + 30
            while not client.server_ready() and time.monotonic() < deadline:
                time.sleep(0.2)
            result = client.infer_features(sample["payload"], sample["meta"], SPLIT, CODEC)
            np.testing.assert_array_equal(result.logits, sample["tail"])
        finally:
            assert second.stop() == 0, second.log()
    finally:
        client.close()
        first.stop()


# ---------------------------------------------------------------------- in-process: error mapping, draining


def test_status_mapping_is_total():
    from cloud_server.errors import Overloaded, status_for

    assert status_for(InvalidInput("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(NotFound("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(Overloaded("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(Unavailable("x"))[0] == grpc.StatusCode.UNAVAILABLE
    code, message = status_for(ZeroDivisionError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL and "secret detail" not in message


def test_dataplane_refuses_work_while_draining_or_overloaded(bundle_dir, sample):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from cloud_server.dataplane import DataPlane
    from cloud_server.errors import Overloaded
    from splitinfer.protocol import converters as cv

    req = cv.InferRequest(model_name=MODEL, inputs=[cv.InferTensor("input", "FP32", sample["x"])])

    async def scenario(pool: ThreadPoolExecutor) -> None:
        plane = await DataPlane.for_bundle(bundle_dir, pool, max_request_batch=MAX_BATCH, max_inflight=1)
        resp = await plane.infer(req)
        np.testing.assert_allclose(resp.outputs[0].data, sample["full"], rtol=1e-5, atol=1e-6)
        plane.inflight = 1
        with pytest.raises(Overloaded):
            await plane.infer(req)
        plane.inflight = 0
        plane.begin_drain()
        assert not plane.ready() and not plane.model_ready(MODEL)
        with pytest.raises(Unavailable, match="shutting down"):
            await plane.infer(req)
        await plane.repository.close()

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(scenario(pool))
