"""TailRuntime's batched decoding: the learned bottleneck's decoder runs once for a batch's payloads and gives
what decoding each payload alone gives; a bad payload is named."""

from __future__ import annotations

import pytest
import torch

from cloud_server.decode import Staged
from cloud_server.tail import TailRuntime
from splitinfer.bundle import load_bundle
from splitinfer.errors import InvalidInput
from tests.support.bundles import make_learned_bundle


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    bundle = load_bundle(make_learned_bundle(tmp_path_factory.mktemp("tail") / "b"))
    tail = TailRuntime(bundle)
    (split,) = bundle.learned_codecs
    codec = bundle.codec_for("bottleneck", split)
    x = bundle.staged.run(torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1)), 0, split)
    payloads = [codec.encode(x[i:i + n])[0] for i, n in ((0, 1), (1, 2), (3, 1), (4, 1))]
    return tail, split, payloads


def test_learned_codec_is_prepared_half_way(learned):
    tail, split, payloads = learned
    staged = tail.prepare_features(payloads[1], "bottleneck", {"v": 1}, split)
    assert isinstance(staged, Staged) and staged.rows.shape[0] == 2


def test_decode_many_equals_decoding_each_alone(learned):
    tail, split, payloads = learned
    n = len(payloads)
    together = tail.decode_many(payloads, ["bottleneck"] * n, [{"v": 1}] * n, split)
    alone = torch.cat([tail.decode_features(p, "bottleneck", {"v": 1}, split) for p in payloads])
    assert together.shape == alone.shape == (5, *tail.boundary_shape(split))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_decode_many_raises_for_a_bad_payload(learned):
    tail, split, payloads = learned
    with pytest.raises(InvalidInput):
        tail.decode_many([payloads[0], payloads[1][:7]], ["bottleneck"] * 2, [{"v": 1}] * 2, split)
