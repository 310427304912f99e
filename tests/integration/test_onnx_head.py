"""The ONNX Runtime head backend (edge_agent/onnx_head/): numerics vs torch, exit decisions, the torch-free
request path in a subprocess (same payload bytes), and refusal of bad or corrupted exports."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.onnx_head import default_bundle, sample_images
from edge_agent.metrics import EdgeMetrics
from edge_agent.onnx_head import (
    MANIFEST_FILE,
    HeadExportError,
    NumpyEdge,
    OnnxHead,
    encode_uint8_affine,
    export_head,
    normalise,
)
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from splitinfer.bundle import Bundle, HeadSpec, load_bundle
from splitinfer.codec import UInt8AffineCodec
from splitinfer.data import to_model_input
from splitinfer.errors import BundleError, InvalidInput
from splitinfer.head import StageBackend, score_logits, walk
from splitinfer.onnx_util import session
from tests.support.bundles import make_learned_bundle, make_test_bundle

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
N_DECISIONS = 300


@dataclasses.dataclass
class Result:
    logits: np.ndarray
    bytes_sent: int = 0
    bytes_received: int = 0
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0
    round_trip_s: float = 0.001


class CapturingClient:
    """Records every payload the runtime sends (after checking it decodes) and answers with fixed logits."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.payloads: list[tuple[bytes, dict]] = []

    def infer_features(self, payload: bytes, meta: dict, split: int, codec: str, request_id: str = "") -> Result:
        self.payloads.append((payload, dict(meta)))
        self.bundle.codec_for(codec, split).decode(payload, meta)
        return Result(np.zeros((1, self.bundle.plan.model.num_classes), np.float32))

    def server_ready(self) -> bool:
        return True

    def check_ready(self) -> None:
        pass

    def close(self) -> None:
        pass


def runtime(bundle: Bundle) -> tuple[EdgeRuntime, CapturingClient]:
    client = CapturingClient(bundle)
    settings = EdgeSettings(bundle=bundle.path, server="127.0.0.1:1", adaptive=False)
    return EdgeRuntime(bundle, client, settings, metrics=EdgeMetrics()), client


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_images(N_DECISIONS)[0]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Random-weight bundles (uint8-affine at split 9 with exits 4 and 8; learned codec at split 8) and the
    committed default model as the demo plans it (split 6, learned codec, exit 6)."""
    d = tmp_path_factory.mktemp("onnx-bundles")
    return {"uint8": make_test_bundle(d / "uint8"), "learned": make_learned_bundle(d / "learned"),
            "demo": default_bundle(d / "demo", 6, [6], "bottleneck")}


@pytest.fixture(scope="module")
def exported(bundles, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx-heads")
    return {name: (export_head(path, out_dir=d / name), d / name)[1] for name, path in bundles.items()}


@pytest.mark.parametrize("name", ["uint8", "learned", "demo"])
def test_boundaries_exit_logits_and_encoder_match_torch(name, bundles, exported, images):
    bundle = load_bundle(bundles[name])
    head = OnnxHead.load(exported[name], bundle_dir=bundles[name])
    x = normalise(images[:64], bundle.plan.input.mean, bundle.plan.input.std)
    x = np.concatenate([x, np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)])
    split, n = bundle.plan.split, bundle.num_stages
    assert head.split == split
    assert head.active_exits == bundle.plan.planned_exits(bundle.exits)
    assert isinstance(head, StageBackend)
    seen = []
    with torch.inference_mode():
        h_t, prev = torch.from_numpy(x.copy()), 0
        for step in walk(head, x, head.split, head.active_exits):
            h_t = bundle.staged.run(h_t.clone(), prev, step.boundary)
            prev = step.boundary
            assert np.abs(step.tensor - h_t.numpy()).max() <= TOL
            if step.boundary in bundle.exits and step.boundary in head.active_exits:
                assert step.logits is not None
                assert np.abs(step.logits - bundle.exits[step.boundary](h_t.clone()).numpy()).max() <= TOL
            seen.append(step.boundary)
        assert seen[-1] == split
        tail = bundle.staged.run(h_t.clone(), split, n).numpy()  # the degraded on-device answer
        assert np.abs(head.run(step.tensor, split, n) - tail).max() <= TOL
        lc = bundle.learned_codec_at(split)
        if lc is not None:
            ref = lc._latent(h_t.clone())
            assert np.abs(head.latent(step.tensor, split) - ref).max() <= TOL
    manifest = head.manifest
    assert all(e.max_abs_diff <= TOL for e in manifest.entries())


def _median_thresholds(bundle: Bundle, x: torch.Tensor) -> dict[int, float]:
    """Per exit, a threshold half-way between the two scores around the median (half the inputs exit, and
    none lies within float noise of the threshold)."""
    out = {}
    with torch.inference_mode():
        h, prev = x.clone(), 0
        for b in sorted(bundle.exits):
            h = bundle.staged.run(h, prev, b)
            prev = b
            s = np.sort(score_logits(bundle.exits[b](h.clone()).numpy()).score)
            mid = len(s) // 2
            out[b] = float((s[mid - 1] + s[mid]) / 2)
    return out


@pytest.fixture(scope="module")
def decision_case(tmp_path_factory, images):
    """The committed model at split 9 with exits 3, 6, 8 active at median thresholds, uint8-affine."""
    probe = load_bundle(default_bundle(tmp_path_factory.mktemp("probe") / "b", 9, [3, 6, 8]))
    x = to_model_input(images, probe.plan.input.mean, probe.plan.input.std)
    thresholds = _median_thresholds(probe, x)
    path = default_bundle(tmp_path_factory.mktemp("decisions") / "b", 9, [3, 6, 8], thresholds=thresholds,
                          learned=False)
    out = tmp_path_factory.mktemp("decisions-onnx") / "head"
    export_head(path, out_dir=out)
    return path, out, x


def test_exit_decisions_identical_to_the_torch_runtime(decision_case):
    path, out, x = decision_case
    bundle = load_bundle(path)
    rt, client = runtime(bundle)
    edge = NumpyEdge(OnnxHead.load(out, bundle_dir=path))
    deciders = set()
    offloaded = 0
    for i in range(len(x)):
        res = rt.infer(x[i : i + 1].clone(), str(i))
        dec = edge.infer(x[i : i + 1].numpy())
        assert dec.decided_by == res.decided_by, i
        if dec.decided_by != "cloud":
            assert dec.label == res.label and dec.confidence == pytest.approx(res.confidence, abs=1e-5)
        else:
            offloaded += 1
            sent, meta = client.payloads[-1]
            assert dec.meta == meta and len(dec.payload) == len(sent)
            # the split tensors differ by float noise (~1e-6): a value may land on the other side of a
            # rounding step; decoded, the two payloads agree to one quantization step
            codec = UInt8AffineCodec()
            a, b = codec.decode(sent, meta).numpy(), codec.decode(dec.payload, dec.meta).numpy()
            groups = np.frombuffer(sent, "<f4", count=2 * a.shape[1])[a.shape[1]:]
            assert (np.abs(a - b) <= groups.reshape(1, -1, 1, 1) * 1.001 + 1e-6).all()
        deciders.add(dec.decided_by)
    rt.close()
    assert {3, 6, 8, "cloud"} <= deciders  # the thresholds make every exit and the offload happen
    assert offloaded > 10


def _run_torch_free(head_dir: Path, bundle_dir: Path, images: np.ndarray, tmp: Path) -> list[dict]:
    np.save(tmp / "images.npy", images)
    proc = subprocess.run([sys.executable, "-m", "edge_agent.onnx_head", "run", "--head", str(head_dir), "--bundle",
                           str(bundle_dir), "--images", str(tmp / "images.npy"), "--out", str(tmp / "out.jsonl")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    assert status == {"requests": len(images), "torch_imported": False}
    return [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]


def _payload(d: dict) -> bytes | None:
    import base64

    return None if d["payload_b64"] is None else base64.b64decode(d["payload_b64"])


def test_torch_free_process_sends_the_torch_runtimes_payload_bytes_learned_codec(bundles, exported, images,
                                                                                 tmp_path):
    """The demo's plan (committed weights, split 6, learned codec, exit 6 never firing here): the subprocess,
    which never imports torch, produces byte for byte the payloads the torch runtime sends."""
    path = bundles["demo"]
    bundle = load_bundle(path)
    never = dataclasses.replace(bundle, plan=bundle.plan.model_copy(update={"exits": [
        e.model_copy(update={"threshold": 1.01}) for e in bundle.plan.exits]}))
    rt, client = runtime(never)
    x = to_model_input(images, bundle.plan.input.mean, bundle.plan.input.std)
    for i in range(len(x)):
        assert rt.infer(x[i : i + 1].clone(), str(i)).decided_by == "cloud"
    rt.close()
    plan = json.loads((path / "plan.json").read_text())
    for e in plan["exits"]:
        e["threshold"] = 1.01
    (tmp_path / "bundle").mkdir()
    for f in path.iterdir():
        shutil.copy(f, tmp_path / "bundle" / f.name)
    (tmp_path / "bundle" / "plan.json").write_text(json.dumps(plan))
    lines = _run_torch_free(exported["demo"], tmp_path / "bundle", images, tmp_path)
    assert [d["decided_by"] for d in lines] == ["cloud"] * len(images)
    assert [_payload(d) for d in lines] == [p for p, _ in client.payloads]
    assert all(d["meta"] == {"v": 1} and d["codec"] == "bottleneck" for d in lines)


@pytest.mark.parametrize("name", ["uint8", "learned"])
def test_torch_free_payloads_equal_the_torch_codecs_on_the_onnx_head(name, bundles, exported, images, tmp_path):
    """Given the ONNX head's split tensor (what EdgeRuntime runs with head_backend=onnx), the torch-free codecs
    (numpy uint8-affine; ORT encoder + ANS for the learned codec) produce the torch codecs' exact bytes, and the
    decisions match the same policy scored with torch."""
    path = bundles[name]
    bundle = load_bundle(path)
    head = OnnxHead.load(exported[name], bundle_dir=path)
    view = head.torch_view()
    lines = _run_torch_free(exported[name], path, images[:100], tmp_path)
    codec = bundle.codec_for(bundle.plan.codec.name, bundle.plan.split)
    x = normalise(images[:100], bundle.plan.input.mean, bundle.plan.input.std)
    thresholds = bundle.thresholds()
    for i, d in enumerate(lines):
        decided: int | str = "cloud"
        with torch.inference_mode():
            for step in walk(head, x[i : i + 1], head.split, head.active_exits):
                h = torch.from_numpy(step.tensor)
                if step.logits is not None:
                    s = score_logits(view.exits[step.boundary](h).numpy()).score
                    if float(s[0]) >= thresholds[step.boundary]:
                        decided = step.boundary
                        break
        assert d["decided_by"] == decided
        if decided == "cloud":
            payload, meta = codec.encode(h)
            assert _payload(d) == payload and d["meta"] == meta
    assert any(d["decided_by"] == "cloud" for d in lines)


def test_numpy_uint8_affine_and_normalisation_are_bit_exact():
    rng = np.random.default_rng(0)
    for shape in ([1, 48, 14, 14], [2, 96, 7, 7], [1, 96], [1, 96, 1, 1], [3, 4, 2, 2]):
        h = (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float32)
        h[..., :1] = np.abs(h[..., :1])  # some channels constant after relu-like clipping
        if len(shape) == 4:
            h[:, 0] = 0.0  # a constant channel: scale falls back to 1
        assert encode_uint8_affine(h) == UInt8AffineCodec().encode(torch.from_numpy(h))
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    assert np.array_equal(normalise(imgs, [0.286], [0.353]), to_model_input(imgs, [0.286], [0.353]).numpy())
    rgb = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(normalise(rgb, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]),
                          to_model_input(rgb, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]).numpy())
    with pytest.raises(InvalidInput):
        encode_uint8_affine(np.full((1, 4, 4, 4), np.nan, np.float32))


@pytest.mark.parametrize("prepared", [False, True])
def test_head_backend_onnx_setting_runs_the_runtime_on_onnx_runtime(bundles, exported, images, prepared):
    """EdgeRuntime with head_backend=onnx (exported at start, or a prepared export): the same decisions as the
    torch runtime, and offloads byte-identical to the torch-free path on the same ONNX head."""
    bundle = load_bundle(bundles["uint8"])
    settings = EdgeSettings(bundle=bundle.path, server="127.0.0.1:1", adaptive=False, head_backend="onnx",
                            onnx_head_dir=exported["uint8"] if prepared else None)
    client = CapturingClient(bundle)
    rt = EdgeRuntime(bundle, client, settings, metrics=EdgeMetrics())
    torch_rt, _ = runtime(bundle)
    assert rt.engine.kind == "onnx" and isinstance(rt.engine.head, OnnxHead)
    x = to_model_input(images[:40], bundle.plan.input.mean, bundle.plan.input.std)
    edge = NumpyEdge(OnnxHead.load(exported["uint8"]))
    for i in range(len(x)):
        res = rt.infer(x[i : i + 1].clone(), str(i))
        dec = edge.infer(x[i : i + 1].numpy())
        assert res.decided_by == dec.decided_by == torch_rt.infer(x[i : i + 1].clone(), str(i)).decided_by
        if dec.decided_by == "cloud":
            assert client.payloads[-1][0] == dec.payload  # identical bytes: same head, same codec arithmetic
    rt.close()
    torch_rt.close()


def test_from_bundle_exports_in_memory_and_on_demand(bundles):
    bundle = load_bundle(bundles["uint8"])
    head = OnnxHead.from_bundle(bundle, operating_points=False)
    x = np.random.default_rng(2).standard_normal((2, 1, 28, 28)).astype(np.float32)
    with torch.inference_mode():
        ref = bundle.staged.run(torch.from_numpy(x.copy()), 0, 12).numpy()
        ref_exit = bundle.exits[8](bundle.staged.run(torch.from_numpy(x.copy()), 0, 8)).numpy()
    assert np.abs(head.run(x, 0, 12) - ref).max() <= TOL  # a split the plan never exported: exported now
    assert np.abs(head.exit_logits(8, head.run(x, 0, 8)) - ref_exit).max() <= TOL


def test_an_export_runs_only_what_it_covers(exported):
    head = OnnxHead.load(exported["uint8"])
    x = np.zeros((1, 1, 28, 28), np.float32)
    assert head.supports(9, [4, 8]) and not head.supports(12, [4, 8])
    with pytest.raises(InvalidInput, match="no segments"):
        head.run(x, 0, 12)
    with pytest.raises(InvalidInput, match="no exit"):
        head.exit_logits(3, np.zeros((1, 32, 28, 28), np.float32))
    with pytest.raises(InvalidInput, match="28, 28"):
        head.run(np.zeros((1, 1, 14, 14), np.float32), 0, 4)
    with pytest.raises(InvalidInput, match="float32"):
        head.run(x.astype(np.float64), 0, 4)
    with pytest.raises(InvalidInput, match="no learned codec"):
        head.latent(np.zeros((1, 96, 7, 7), np.float32))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupted_or_foreign_exports_are_refused(exported, bundles, tmp_path):
    src = exported["uint8"]
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    seg = manifest["segments"][0]["file"]

    flipped = _copy(src, tmp_path / "flipped")
    data = bytearray((flipped / seg).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / seg).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        OnnxHead.load(flipped)

    garbage = _copy(src, tmp_path / "garbage")  # not ONNX at all, but the manifest vouches for it
    (garbage / seg).write_bytes(b"\x08\x07garbage, not a protobuf model" * 10)
    m = json.loads((garbage / MANIFEST_FILE).read_text())
    import hashlib

    m["segments"][0]["sha256"] = hashlib.sha256((garbage / seg).read_bytes()).hexdigest()
    (garbage / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        OnnxHead.load(garbage)

    swapped = _copy(src, tmp_path / "swapped")  # a valid ONNX file where another is expected (shape check)
    exit_file = manifest["exits"][0]["file"]
    (swapped / seg).write_bytes((swapped / exit_file).read_bytes())
    m = json.loads((swapped / MANIFEST_FILE).read_text())
    m["segments"][0]["sha256"] = manifest["exits"][0]["sha256"]
    (swapped / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="input shape"):
        OnnxHead.load(swapped)

    missing = _copy(src, tmp_path / "missing")
    (missing / seg).unlink()
    with pytest.raises(BundleError, match="missing"):
        OnnxHead.load(missing)

    for name, text, match in [("truncated", (src / MANIFEST_FILE).read_text()[:100], "not valid JSON"),
                              ("foreign", json.dumps({"format": "something-else"}), "not an exported"),
                              ("future", json.dumps({**manifest, "version": 99}), "version 99"),
                              ("schema", json.dumps({**manifest, "segments": "x"}), "schema"),
                              ("escape", json.dumps({**manifest, "segments": [
                                  {**manifest["segments"][0], "file": "../x.onnx"}]}), "outside")]:
        bad = _copy(src, tmp_path / name)
        (bad / MANIFEST_FILE).write_text(text)
        with pytest.raises(BundleError, match=match):
            OnnxHead.load(bad)
    with pytest.raises(BundleError, match=f"no {MANIFEST_FILE}"):
        OnnxHead.load(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="other weights"):  # exported from another bundle's weights
        OnnxHead.load(src, bundle_dir=bundles["learned"])
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        session(b"", "empty.onnx")


def test_int8_heads_are_not_exported(bundles, tmp_path):
    bundle = load_bundle(bundles["uint8"])
    int8 = dataclasses.replace(bundle, plan=bundle.plan.model_copy(
        update={"head": HeadSpec(kind="int8", cuts=[0, 4, 8, 9])}))
    with pytest.raises(HeadExportError, match="int8"):
        export_head(int8, out_dir=tmp_path / "x")
    assert issubclass(HeadExportError, BundleError)


def test_importing_the_onnx_head_does_not_import_torch():
    code = ("import sys, edge_agent.onnx_head, splitinfer.codec_numpy, splitinfer.onnx_util; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_export_carries_its_plan_and_numpy_edge_applies_the_plans_rules(bundles, exported, images):
    """Without the bundle, the plan copied into the export gives the rules: the exits evaluated at a split
    (Plan.exits_at) and the codec there (Plan.codec_at, uint8-affine where the learned codec does not apply); the
    numpy codecs give the torch codecs' bytes."""
    head = OnnxHead.load(exported["learned"])
    bundle = load_bundle(bundles["learned"])
    plan = bundle.plan  # split 8, learned codec at 8, exit 4
    assert head.plan is not None and head.plan.files == plan.files
    assert head.policy().thresholds == bundle.thresholds()
    planned = NumpyEdge(head)
    assert (planned.split, planned.exits, planned.codec) == (8, plan.planned_exits(), "bottleneck")
    at4 = NumpyEdge(head, 4)  # not an exported configuration, but its segment 0 -> 4 is
    assert (at4.exits, at4.codec) == (plan.exits_at(4), "uint8-affine")
    assert NumpyEdge(head, 8, exits=[]).exits == []
    with pytest.raises(InvalidInput, match="cannot be used at split 4"):
        NumpyEdge(head, 4, codec="bottleneck")
    x = normalise(images[:20], plan.input.mean, plan.input.std)
    for i in range(len(x)):
        d = at4.infer(x[i : i + 1])
        assert d.decided_by in (4, "cloud") and d.exit_scores.keys() == {4}
    h = np.random.default_rng(3).standard_normal((2, *plan.boundaries[8].shape)).astype(np.float32)
    for name in ("float32", "uint8-affine"):
        assert head.codec(name).encode(h) == bundle.codec_for(name, 8).encode(torch.from_numpy(h))
    assert head.codec("bottleneck", 8).encode(h)[0] == bundle.learned_codecs[8].encode(torch.from_numpy(h))[0]
    with pytest.raises(InvalidInput, match="boundary 8, not 4"):
        head.codec("bottleneck", 4)


def test_bench_measure_config_smoke(bundles, exported, images):
    """bench.onnx_head's in-process measurement (the one walk and policy on both backends) keeps its fields."""
    from bench.onnx_head import measure_config

    res = measure_config("demo", bundles["demo"], exported["demo"], images[:8], warmup=2)
    assert {"torch_head", "ort_head", "view_head", "torch_encode", "ort_encode", "torch_policy",
            "ort_policy"} <= set(res["latency"])
    assert res["agreement"]["requests"] == 8 and res["agreement"]["same_decision"] == 8
    assert res["codec"] == "bottleneck" and res["exits"] == [6]
