"""The privacy pieces: the leakage table (lookup, borrowing from earlier boundaries, checks), the max-leakage
constraint and privacy objective in the search, the inversion decoder's shapes, image quality scores, the
attack harness telling an informative payload from noise, and the adversarial defence's training hook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from partitioner.privacy import (
    AttackConfig,
    InversionDecoder,
    LeakageEntry,
    LeakageTable,
    fit_decoder,
    image_quality,
    reconstruct,
)
from partitioner.search import Constraints, Objective, choose_among, metric
from splitinfer.bundle import SplitEstimate
from splitinfer.errors import BundleError


def _table() -> LeakageTable:
    return LeakageTable("default", 17, [LeakageEntry(0, "image", 0.99), LeakageEntry(4, "uint8-affine", 0.9),
                                        LeakageEntry(9, "uint8-affine", 0.7), LeakageEntry(6, "bottleneck", 0.6)])


def test_lookup_measured_borrowed_and_edge_only():
    t = _table()
    assert t.lookup(9, "uint8-affine") == (0.7, "measured")
    assert t.lookup(6, "bottleneck") == (0.6, "measured")
    # boundary 11 was not measured: the deepest measured boundary before it stands in (data processing)
    assert t.lookup(11, "uint8-affine") == (0.7, "from boundary 9 (uint8-affine)")
    assert t.lookup(7, "bottleneck") == (0.6, "from boundary 6 (bottleneck)")
    assert t.lookup(5, "bottleneck") == (0.9, "from boundary 4 (uint8-affine)")
    assert t.lookup(17, "uint8-affine") == (0.0, "edge-only")
    assert t.lookup(2, "uint8-affine") is None  # nothing measured at or before it
    assert t.ssim(2, "uint8-affine") is None


def test_table_round_trip_and_refusals(tmp_path):
    t = _table()
    path = t.save(tmp_path / "leak.json")
    back = LeakageTable.load(path)
    assert back.entries == t.entries and back.num_stages == 17
    with pytest.raises(BundleError, match="does not exist"):
        LeakageTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        LeakageTable.load(tmp_path / "bad.json")
    d = t.to_dict()
    with pytest.raises(BundleError, match="not a leakage table"):
        LeakageTable.from_dict({**d, "format": "other"})
    with pytest.raises(BundleError, match="version"):
        LeakageTable.from_dict({**d, "version": 99})
    d["entries"][0]["ssim"] = 3.0
    (tmp_path / "range.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="out of range"):
        LeakageTable.load(tmp_path / "range.json")


def _est(split: int, latency: float, leak: float | None, offload: float = 1.0) -> SplitEstimate:
    return SplitEstimate(split=split, expected_latency_ms=latency, edge_ms=1, transfer_ms=1, server_ms=1,
                         bytes_per_offload=100, offload_rate=offload, exits=[], leakage_ssim=leak)


def test_max_leakage_constraint_and_message():
    fast, mid, edge = _est(0, 1.0, 0.99), _est(9, 2.0, 0.5), _est(17, 5.0, 0.0, offload=0.0)
    assert choose_among([fast, mid, edge], Objective(), Constraints()) is fast
    assert choose_among([fast, mid, edge], Objective(), Constraints(max_leakage=0.6)) is mid
    assert choose_among([fast, mid, edge], Objective(), Constraints(max_leakage=0.1)) is edge
    # a configuration whose leakage is unknown is not admitted under the constraint
    assert not Constraints(max_leakage=0.9).admits(_est(3, 1.0, None))
    assert Constraints().admits(_est(3, 1.0, None))
    with pytest.raises(ValueError, match=r"tightest constraint is --max-leakage 0.1: 0 of 2 .* best any "
                                         r"configuration reaches is 0.5 SSIM"):
        choose_among([fast, mid], Objective(), Constraints(max_leakage=0.1))


def test_privacy_objective():
    a, b = _est(0, 1.0, 0.99), _est(9, 2.0, 0.5, offload=0.5)
    assert metric(b, "privacy") == pytest.approx(0.25)
    assert choose_among([a, b], Objective("privacy")) is b
    assert Objective("privacy").uses_privacy and Objective.parse("weighted", "latency=1,privacy=2").uses_privacy
    assert not Objective.parse("weighted", "latency=1").uses_privacy
    with pytest.raises(ValueError, match="privacy"):
        Objective("secrecy")


@pytest.mark.parametrize("shape", [(48, 14, 14), (32, 28, 28), (96, 7, 7), (96, 1, 1), (96,), (8, 7, 7),
                                   (8, 50, 1), (50, 96)])  # token latents and token sequences too
def test_inversion_decoder_shapes(shape):
    dec = InversionDecoder(shape, (1, 28, 28), extra=10).eval()
    with torch.no_grad():
        out = dec(torch.randn(3, *shape), torch.rand(3, 10))
    assert out.shape == (3, 1, 28, 28)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    raw = InversionDecoder(shape, (1, 28, 28), bounded=False).eval()(torch.randn(2, *shape))
    assert raw.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="extra input"):
        dec(torch.randn(2, *shape))


def test_image_quality():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((4, 1, 28, 28), dtype=np.float32))
    s, p = image_quality(img, img)
    assert s == pytest.approx(1.0) and p == 100.0
    noisy = (img + 0.3 * torch.randn_like(img)).clamp(0, 1)
    s2, p2 = image_quality(noisy, img)
    assert s2 < 0.9 and p2 < 20


def test_attack_tells_an_informative_payload_from_noise():
    """The same decoder trained on a payload that carries the image (a 2x2-pooled copy) and on one that carries
    nothing (noise) must score far apart on held-out images: the harness measures information, not luck."""
    from splitinfer.data import load_fashion_mnist

    try:
        data = load_fashion_mnist("test")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    img = torch.from_numpy(data.images[:1200]).float().div(255).unsqueeze(1)
    train, test = img[:1000], img[1000:]
    cfg = AttackConfig(epochs=3, batch_size=64)
    pooled = torch.nn.functional.avg_pool2d(img, 2).repeat(1, 4, 1, 1)  # [4, 14, 14]
    noise = torch.randn_like(pooled)
    scores = {}
    for name, view in (("pooled", pooled), ("noise", noise)):
        dec = fit_decoder(view[:1000], train, cfg)
        scores[name] = image_quality(reconstruct(dec, view[1000:]), test)[0]
    assert scores["pooled"] > scores["noise"] + 0.2, scores


def test_distill_config_privacy_checks():
    from splitinfer.bottleneck import DistillConfig

    with pytest.raises(ValueError, match="privacy defence must be one of none, adversarial"):
        DistillConfig(privacy="noise")
    with pytest.raises(ValueError, match="privacy_weight"):
        DistillConfig(privacy="adversarial", privacy_weight=-1)


def test_adversarial_training_runs_and_reports_the_adversary():
    from splitinfer.bottleneck import BottleneckConfig, DistillConfig, train_bottleneck
    from splitinfer.models import build_model
    from splitinfer.staged import stage_model

    torch.manual_seed(0)
    staged = stage_model(build_model("default").eval(), torch.zeros(1, 1, 28, 28))
    cfg = BottleneckConfig.for_boundary(6, staged.boundaries[6].shape, bits=2)
    x = torch.randn(64, 1, 28, 28)
    bn, report = train_bottleneck(staged, cfg, x, DistillConfig(epochs_float=1, epochs_qat=1, batch_size=32,
                                                                privacy="adversarial", privacy_weight=0.5),
                                  progress=False)
    assert all("adversary_loss" in h and np.isfinite(h["adversary_loss"]) for h in report["history"])
    assert report["distill"]["privacy"] == "adversarial"
    plain = train_bottleneck(staged, cfg, x, DistillConfig(epochs_float=1, epochs_qat=0, batch_size=32),
                             progress=False)[1]
    assert all("adversary_loss" not in h for h in plain["history"])
