"""Edge runtime policy (exits, offload, fallback, recheck) with a fake cloud client, and upload decoding."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_agent.runtime import EdgeRuntime
from splitinfer.bundle import Bundle, load_bundle
from splitinfer.codec import get_codec
from splitinfer.data import to_model_input
from splitinfer.errors import InvalidInput, Unavailable
from splitinfer.imaging import (
    InputTooLarge,
    UnprocessableInput,
    UnsupportedMediaType,
    decode_npy,
    decode_upload,
)
from tests.support.bundles import TEST_EXITS, make_test_bundle
from tests.support.fakes import FakeClock, make_runtime, sample, with_plan


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory) -> Bundle:
    return load_bundle(make_test_bundle(tmp_path_factory.mktemp("edge") / "b"))


def metric(rt: EdgeRuntime, name: str, **labels: str) -> float:
    value = rt.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_confident_first_exit_answers_without_the_server(base_bundle):
    rt, client = make_runtime(with_plan(base_bundle, (0.0, 0.0)))
    res = rt.infer(sample(), "r1")
    assert res.decided_by == TEST_EXITS[0]
    assert not res.degraded and res.outcome == "edge_exit"
    assert client.calls == 0
    assert res.bytes_sent == 0 and res.energy_j["radio"] == 0.0
    assert res.class_name == base_bundle.plan.input.labels[res.label]
    assert 0.0 <= res.confidence <= 1.0
    assert metric(rt, "splitinfer_edge_exits_total", exit=str(TEST_EXITS[0])) == 1
    assert metric(rt, "splitinfer_edge_requests_total", outcome="edge_exit") == 1
    rt.close()


def test_thresholds_above_one_offload_every_request(base_bundle):
    bundle = with_plan(base_bundle, (1.01, 1.01))
    rt, client = make_runtime(bundle)
    for i in range(3):
        x = sample(i)
        res = rt.infer(x, f"r{i}")
        assert res.decided_by == "cloud" and not res.degraded
        with torch.inference_mode():
            h = bundle.staged.run(x, 0, bundle.plan.split)
            payload, meta = get_codec("uint8-affine").encode(h)
            expected = client.infer_features(payload, meta, bundle.plan.split, "uint8-affine").logits
        assert res.label == int(expected.argmax())
        assert res.bytes_sent > 0 and res.bytes_received == 80
        assert res.energy_j["radio"] > 0 and res.energy_j["compute"] >= 0
        assert res.latency_ms["total"] >= res.latency_ms["head"]
        # the call's time splits into the server's reported queue + compute (0.2 + 1.5 ms, capped by the call's
        # own wall time) as "tail" and the rest as "transfer"
        assert 0 < res.latency_ms["tail"] <= 1.7 + 1e-6 and res.latency_ms["transfer"] >= 0
    assert client.calls == 6  # 3 by the runtime, 3 by the test
    assert rt.server_up is True
    assert metric(rt, "splitinfer_edge_requests_total", outcome="cloud") == 3
    assert metric(rt, "splitinfer_edge_bytes_sent_total") > 0
    # the fake's round trips are all the same: an RTT, too little serialization time to measure bandwidth on
    assert metric(rt, "splitinfer_edge_rtt_seconds") == pytest.approx(0.004 - 0.0017, rel=1e-3)
    assert metric(rt, "splitinfer_edge_server_up") == 1
    split = str(bundle.plan.split)
    assert metric(rt, "splitinfer_edge_operating_point", split=split, codec="uint8-affine") == 1
    assert metric(rt, "splitinfer_edge_energy_joules_total", component="radio", method="model") > 0
    rt.close()


def test_server_failure_degrades_then_skips_then_recovers(base_bundle):
    clock = FakeClock()
    rt, client = make_runtime(with_plan(base_bundle, (1.01, 1.01)), clock)
    client.fail = Unavailable("cloud server down")
    res = rt.infer(sample(), "a")
    assert res.degraded and res.outcome == "fallback"
    assert res.decided_by == max(TEST_EXITS)  # the deepest exit in the head, below its threshold
    assert client.calls == 1 and rt.server_up is False
    assert metric(rt, "splitinfer_edge_server_up") == 0

    clock.now += 4.0  # within recheck_interval_s: no new attempt
    res = rt.infer(sample(1), "b")
    assert res.degraded and res.decided_by == max(TEST_EXITS)
    assert client.calls == 1
    assert rt.status()["server"]["retry_in_s"] == pytest.approx(1.0)

    clock.now += 1.5  # interval passed, server still down: one attempt, then skip again
    rt.infer(sample(2), "c")
    assert client.calls == 2
    rt.infer(sample(3), "d")
    assert client.calls == 2

    client.fail = None
    clock.now += 5.0
    res = rt.infer(sample(4), "e")
    assert res.decided_by == "cloud" and not res.degraded
    assert client.calls == 3 and rt.server_up is True
    res = rt.infer(sample(5), "f")
    assert res.decided_by == "cloud" and client.calls == 4
    assert metric(rt, "splitinfer_edge_requests_total", outcome="fallback") == 4
    assert metric(rt, "splitinfer_edge_requests_total", outcome="cloud") == 2
    rt.close()


def test_any_transport_exception_and_bad_answers_fall_back(base_bundle):
    rt, client = make_runtime(with_plan(base_bundle, (1.01, 1.01)))
    client.fail = RuntimeError("grpc exploded")
    assert rt.infer(sample(), "a").degraded
    assert "grpc exploded" in rt.status()["server"]["last_error"]

    rt2, client2 = make_runtime(with_plan(base_bundle, (1.01, 1.01)))
    client2.bad_logits = True
    res = rt2.infer(sample(), "b")
    assert res.degraded and res.decided_by == max(TEST_EXITS)
    rt.close()
    rt2.close()


def test_without_exits_in_the_head_the_tail_runs_locally(base_bundle):
    bundle = with_plan(base_bundle, (1.01, 1.01), split=3)  # exits at 4 and 8 lie beyond the split
    rt, client = make_runtime(bundle)
    client.fail = Unavailable("down")
    x = sample()
    res = rt.infer(x, "a")
    assert res.degraded and res.decided_by == bundle.num_stages
    with torch.inference_mode():
        assert res.label == int(bundle.staged(x).argmax())
    assert res.latency_ms["tail"] > 0 and res.latency_ms["exit"] == 0
    rt.close()


def test_edge_only_split_never_calls_the_server(base_bundle):
    bundle = with_plan(base_bundle, (1.01, 1.01), split=base_bundle.num_stages)
    rt, client = make_runtime(bundle)
    res = rt.infer(sample(), "a")
    assert res.decided_by == bundle.num_stages and not res.degraded and client.calls == 0
    rt.close()


def test_input_checks_and_worker_submission(base_bundle):
    rt, _ = make_runtime(with_plan(base_bundle, (0.0, 0.0)))
    with pytest.raises(InvalidInput, match="shape"):
        rt.infer(torch.zeros(2, 1, 28, 28))
    with pytest.raises(InvalidInput, match="dtype"):
        rt.infer(torch.zeros(1, 1, 28, 28, dtype=torch.float64))
    res = rt.submit(sample(), "w").result(timeout=60)
    assert res.request_id == "w" and res.decided_by == TEST_EXITS[0]
    status = rt.status()
    assert status["counters"]["requests"]["edge_exit"] == 1 and status["counters"]["pending"] == 0
    assert [e["boundary"] for e in status["exits"]] == list(TEST_EXITS)
    rt.close()
    with pytest.raises(Unavailable):
        rt.submit(sample(), "late")


# ---------------------------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def spec(base_bundle):
    return base_bundle.plan.input


def png_bytes(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def pixels(shape=(28, 28)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)


def test_png_grey_matches_the_training_normalisation(spec):
    img = pixels()
    x = decode_upload(png_bytes(img), spec)
    assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32
    assert np.array_equal(x, to_model_input(img[None], spec.mean, spec.std).numpy())


def test_rgb_jpeg_of_another_size_is_converted_and_resized(spec):
    x = decode_upload(png_bytes(pixels((50, 40, 3)), fmt="JPEG"), spec)
    assert x.shape == (1, 1, 28, 28) and np.isfinite(x).all()
    x = decode_upload(png_bytes(pixels((64, 64, 3))), spec)
    assert x.shape == (1, 1, 28, 28)


@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28), (1, 1, 28, 28)])
def test_npy_uint8_shapes(spec, shape):
    img = pixels((28, 28))
    x = decode_upload(npy_bytes(img.reshape(shape)), spec)
    assert np.array_equal(x, to_model_input(img[None], spec.mean, spec.std).numpy())


def test_npy_float_is_taken_as_normalised(spec):
    arr = np.random.default_rng(1).standard_normal((1, 28, 28)).astype(np.float64)
    x = decode_npy(npy_bytes(arr), spec)
    assert np.array_equal(x, arr.astype(np.float32)[None])
    fortran = np.asfortranarray(np.random.default_rng(2).standard_normal((1, 1, 28, 28)).astype(np.float32))
    assert np.array_equal(decode_npy(npy_bytes(fortran), spec), np.ascontiguousarray(fortran))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(("data", "error", "message"), [
    (b"", InvalidInput, "empty"),
    (b"hello, this is not an image", UnsupportedMediaType, "not a PNG, JPEG or .npy"),
    (pickle.dumps(_Evil()), UnsupportedMediaType, "not a PNG"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, InvalidInput, "not an image"),
    (b"\x93NUMPY\x01\x00garbage", InvalidInput, "malformed .npy header"),
])
def test_garbage_is_refused(spec, data, error, message):
    with pytest.raises(error, match=message):
        decode_upload(data, spec)


def test_truncated_files_are_refused(spec):
    png = png_bytes(pixels())
    with pytest.raises(InvalidInput, match="truncated|not an image"):
        decode_upload(png[: len(png) // 2], spec)
    jpg = png_bytes(pixels((28, 28, 3)), fmt="JPEG")
    with pytest.raises(InvalidInput, match="truncated|not an image"):
        decode_upload(jpg[: len(jpg) // 2], spec)
    npy = npy_bytes(pixels())
    with pytest.raises(InvalidInput, match="truncated"):
        decode_upload(npy[:-10], spec)


def test_npy_pickles_wrong_shapes_dtypes_and_nans_are_refused(spec):
    with pytest.raises(InvalidInput, match="object"):
        decode_upload(npy_bytes(np.array([_Evil(), 1], dtype=object)), spec)
    with pytest.raises(UnprocessableInput, match="wrong shape"):
        decode_upload(npy_bytes(pixels((3, 28, 28))), spec)
    with pytest.raises(UnprocessableInput, match="wrong shape"):
        decode_upload(npy_bytes(pixels((28, 27))), spec)
    with pytest.raises(UnprocessableInput, match="dtype"):
        decode_upload(npy_bytes(pixels().astype(np.int64)), spec)
    with pytest.raises(InvalidInput, match="empty"):
        decode_upload(npy_bytes(np.zeros((0, 28), dtype=np.uint8)), spec)
    bad = np.zeros((28, 28), dtype=np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(UnprocessableInput, match="NaN"):
        decode_upload(npy_bytes(bad), spec)


def test_huge_npy_header_does_not_allocate(spec):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (100000, 100000)})
    with pytest.raises(InvalidInput, match="truncated"):
        decode_upload(header.getvalue() + b"\x00" * 64, spec)


def test_decompression_bomb_is_refused_before_decoding(spec, tmp_path: Path):
    bomb = Image.new("1", (20000, 20000))
    buf = io.BytesIO()
    bomb.save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) < 200_000
    with pytest.raises(InputTooLarge, match="too large"):
        decode_upload(data, spec)
    with pytest.raises(InputTooLarge, match="too large"):
        decode_upload(png_bytes(pixels((300, 300))), spec, max_image_pixels=10_000)


def test_a_request_the_server_refuses_does_not_mark_it_down(base_bundle):
    rt, client = make_runtime(with_plan(base_bundle, (1.01, 1.01)))
    client.fail = InvalidInput("garbled uint8-affine payload")
    res = rt.infer(sample(), "refused")
    assert res.degraded and client.calls == 1
    client.fail = None
    res = rt.infer(sample(1), "next")  # the next request is offloaded at once: the server was never 'down'
    assert res.decided_by == "cloud" and not res.degraded and client.calls == 2
    rt.close()


def test_inputs_driving_the_model_to_non_finite_values_are_refused(base_bundle):
    rt, client = make_runtime(with_plan(base_bundle, (1.01, 1.01)))
    huge = torch.full((1, 1, 28, 28), 3e38)
    huge[..., ::2] = -3e38
    with pytest.raises(InvalidInput, match="non-finite"):
        rt.infer(huge, "huge")
    assert client.calls == 0 and rt.status()["server"]["up"] is not False
    rt.close()


def test_operating_point_switches_split_codec_and_exits(base_bundle):
    bundle = with_plan(base_bundle, (1.01, 1.01), split=10)
    bundle = dataclasses.replace(bundle, plan=bundle.plan.model_copy(update={"active_exits": [8]}))
    rt, client = make_runtime(bundle)
    assert rt.head_exits == [8] and rt.split == 10  # the plan enables only exit 8
    rt.set_operating_point(6)
    assert rt.split == 6 and rt.head_exits == [4] and rt.codec_name == bundle.plan.codec.name
    res = rt.infer(sample(), "r")
    assert res.decided_by == "cloud" and client.calls == 1
    rt.set_operating_point(12, exits=[])
    assert rt.head_exits == []
    rt.set_operating_point(bundle.num_stages)  # edge-only: nothing is sent
    res = rt.infer(sample(1), "r2")
    assert res.decided_by == bundle.num_stages and client.calls == 1
    assert metric(rt, "splitinfer_edge_operating_point", split=str(bundle.num_stages),
                  codec=bundle.plan.codec.name) == 1
    with pytest.raises(InvalidInput, match="outside"):
        rt.set_operating_point(bundle.num_stages + 1)
    with pytest.raises(InvalidInput, match="not in the bundle"):
        rt.set_operating_point(5, exits=[3])
    with pytest.raises(InvalidInput, match="cannot be used"):
        rt.set_operating_point(5, codec="no-such-codec")
    assert rt.split == bundle.num_stages  # a refused switch changes nothing
    rt.close()


def test_probes_wait_for_an_idle_agent_unless_the_last_probe_is_too_old(base_bundle):
    clock = FakeClock()
    rt, _ = make_runtime(with_plan(base_bundle, (0.0, 0.0)), clock, probe_interval_s=5.0, probe_idle_s=0.2,
                         probe_max_interval_s=15.0)
    try:
        assert not rt.needs_probe()  # just started: the interval has not passed
        clock.now += 6.0
        assert rt.needs_probe()  # interval passed, nothing served yet: idle
        rt.infer(sample(), "busy")
        assert not rt.needs_probe()  # a request just finished: not idle for probe_idle_s yet
        clock.now += 0.25
        assert rt.needs_probe()
        for _ in range(100):  # continuous load: a request every 0.1 s never leaves the agent idle
            rt.infer(sample(), "load")
            if clock.now - 1000.0 < 15.0:
                assert not rt.needs_probe(), clock.now
            clock.now += 0.1
        assert clock.now - 1000.0 >= 15.0
        assert rt.needs_probe()  # the last probe (at start) is older than probe_max_interval_s: probe anyway
    finally:
        rt.close()


def test_a_multithreaded_head_is_loaded_in_a_thread_that_ends(bundle_dir, monkeypatch):
    """With torch_threads > 1 the bundle loads in a one-off thread (its OpenMP team must not stay beside the
    inference worker's: splitinfer/omp_teams.py); with 1, where no team exists, in the caller's."""
    import threading

    from edge_agent import runtime as edge_runtime
    from edge_agent.settings import EdgeSettings

    seen: list[str] = []
    real = edge_runtime._torch_bundle_engine_now
    monkeypatch.setattr(edge_runtime, "_torch_bundle_engine_now",
                        lambda s: seen.append(threading.current_thread().name) or real(s))
    before = torch.get_num_threads()
    try:
        settings = EdgeSettings(bundle=bundle_dir, server="127.0.0.1:1", torch_threads=2)
        engine = edge_runtime._torch_bundle_engine(settings)
        assert engine is not None and seen == ["load-bundle"]
        assert not [t for t in threading.enumerate() if t.name == "load-bundle"]
        edge_runtime._torch_bundle_engine(EdgeSettings(bundle=bundle_dir, server="127.0.0.1:1", torch_threads=1))
        assert seen[-1] == threading.current_thread().name
    finally:
        torch.set_num_threads(before)


def test_a_near_runner_up_is_explored_for_one_request_without_a_switch(base_bundle):
    """Rule predicted, offloading at split 10 (predicted 19.1 ms at 10 Mbit/s, 5 ms) with edge-only predicted 20 ms:
    the tenth request runs edge-only to measure it; the operating point in use (and its gauge) stays at 10."""
    from splitinfer.plan import OperatingPoint

    bundle = with_plan(base_bundle, (1.01, 1.01), split=10)
    n = bundle.num_stages
    codec = bundle.plan.codec.name
    cloud = OperatingPoint(bandwidth_bps=10e6, rtt_ms=5.0, split=10, codec=codec, exits=[], expected_latency_ms=19.1,
                           expected_bytes=10_000, edge_part_ms=1.0, server_ms=5.0, offload_rate=1.0,
                           request_bytes=10_000, response_bytes=100)
    edge = cloud.model_copy(update={"split": n, "edge_part_ms": 20.0, "server_ms": 0.0, "offload_rate": 0.0,
                                    "request_bytes": 0.0, "response_bytes": 0.0, "expected_latency_ms": 20.0})
    plan = bundle.plan.model_copy(update={"active_exits": [], "operating_points": [cloud, edge],
                                          "objective": {"objective": "latency"}})
    clock = FakeClock()
    rt, client = make_runtime(dataclasses.replace(bundle, plan=plan), clock, explore_every=10)
    try:
        assert rt.links.learns and rt.selector.rule == "predicted"
        outcomes = []
        for i in range(10):
            rt.link.observe_rtt(0.005)  # the link of the cell (the fake client's transfers are instantaneous)
            rt.link.observe_transfer(100_000, 0.005 + 100_000 * 8 / 10e6)
            outcomes.append(rt.infer(sample(i), f"r{i}").decided_by)
            clock.now += 0.05
        assert outcomes[:9] == ["cloud"] * 9 and outcomes[9] == n  # the tenth ran on the device
        assert client.calls == 9 and rt.split == 10
        assert metric(rt, "splitinfer_edge_explorations_total") == 1
        assert metric(rt, "splitinfer_edge_operating_point", split="10", codec=codec) == 1
        assert metric(rt, "splitinfer_edge_operating_point", split=str(n), codec=codec) == 0
        assert [f["split"] for f in rt.status()["adaptive"]["measured_factors"]] == [10, n]
    finally:
        rt.close()
