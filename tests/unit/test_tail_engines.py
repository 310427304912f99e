"""Tail engines (cloud_server/tail_engines.py): each answers what eager torch answers, auto says why it chose,
engines are built where the edge sends features, a bad split list or a disagreeing engine is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_server import tail_engines
from cloud_server.tail import TailRuntime
from splitinfer.bundle import load_bundle
from splitinfer.errors import BundleError
from tests.support.bundles import TEST_SPLIT, make_learned_bundle, make_test_bundle


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return make_test_bundle(tmp_path_factory.mktemp("engines") / "b")


def _features(bundle, split: int, n: int = 4) -> torch.Tensor:
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return bundle.staged.run(x, 0, split)


@pytest.mark.parametrize("engine", ["torchscript", "onnxruntime", "auto"])
def test_engine_answers_equal_eager_torch(bundle_path, engine):
    eager = TailRuntime(load_bundle(bundle_path))
    fast = TailRuntime(load_bundle(bundle_path), engine=engine)
    assert set(fast.engines) == {TEST_SPLIT}  # the plan's split (it has no operating points, no learned codec)
    if engine != "auto":
        assert fast.engines[TEST_SPLIT].name == engine
    x = _features(fast.bundle, TEST_SPLIT)
    ref = eager.run_tail(x.clone(), TEST_SPLIT)
    got = fast.run_tail(x.clone(), TEST_SPLIT)
    assert got.shape == ref.shape == (4, 10)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    # another split has no engine and runs eagerly, still correct
    y = _features(fast.bundle, 3)
    assert np.array_equal(fast.run_tail(y.clone(), 3), eager.run_tail(y.clone(), 3))


def test_auto_times_every_engine_and_names_its_choice(bundle_path):
    rt = TailRuntime(load_bundle(bundle_path), engine="auto", engine_splits=[2, TEST_SPLIT])
    assert set(rt.engine_choices) == {2, TEST_SPLIT}
    choice = rt.engine_choices[TEST_SPLIT]
    assert set(choice.timings_ms) == {"torch", "torchscript", "onnxruntime"}
    assert all(set(per) == set(tail_engines.TIME_BATCHES) for per in choice.timings_ms.values())
    fastest = min(choice.timings_ms, key=lambda n: sum(choice.timings_ms[n].values()))
    assert choice.engine.name == fastest and f"auto: {fastest} is the fastest" in choice.reason


def test_out_of_range_engine_split_is_refused(bundle_path):
    with pytest.raises(BundleError, match=r"tail engine splits \[99\] out of range"):
        TailRuntime(load_bundle(bundle_path), engine="onnxruntime", engine_splits=[99])
    with pytest.raises(BundleError, match="unknown tail engine"):
        TailRuntime(load_bundle(bundle_path), engine="tensorrt")


def test_a_disagreeing_engine_is_refused(bundle_path, monkeypatch):
    bundle = load_bundle(bundle_path)
    real = tail_engines.onnxruntime_engine

    def broken(staged, split, example, threads):
        engine = real(staged, split, example, threads)
        run = engine.run
        engine.run = lambda x: run(x) + 1.0
        return engine

    monkeypatch.setattr(tail_engines, "onnxruntime_engine", broken)
    with pytest.raises(BundleError, match="disagrees with torch"):
        TailRuntime(bundle, engine="onnxruntime")
    rt = TailRuntime(load_bundle(bundle_path), engine="auto")  # auto skips it and says so
    assert "onnxruntime" in rt.engine_choices[TEST_SPLIT].refused
    assert rt.engine_choices[TEST_SPLIT].engine.name != "onnxruntime"


@pytest.mark.parametrize("decoder", ["torch", "onnxruntime"])
def test_decoder_engine_runs_the_learned_decoder(tmp_path, decoder):
    path = make_learned_bundle(tmp_path / "learned")
    rt = TailRuntime(load_bundle(path), engine="onnxruntime", decoder_engine=decoder)
    (split,) = rt.bundle.learned_codecs
    assert rt.bundle.learned_codecs[split].backend == decoder
    assert rt.engines[split].name == "onnxruntime"
    codec = rt.bundle.codec_for("bottleneck", split)
    payload, meta = codec.encode(_features(rt.bundle, split, 2))
    ref = TailRuntime(load_bundle(path)).run_features(payload, "bottleneck", meta, split)
    got = rt.run_features(payload, "bottleneck", meta, split)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
