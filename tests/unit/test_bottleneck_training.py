"""Bottlenecks for any model: the size rule, the nearer match boundary, features recomputed when they do not fit,
training several boundaries within a time budget, training data, and the committed codec under either name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from partitioner.codec import (
    NormalisedImages,
    image_folder_inputs,
    load_bottlenecks,
    load_default_bottleneck,
    save_bottleneck,
)
from partitioner.weights import weights_dir
from splitinfer.bottleneck import (
    DEFAULT_MAX_TAIL_COST,
    BottleneckConfig,
    DistillConfig,
    match_boundary,
    tail_cost,
    train_bottleneck,
    train_bottlenecks,
)
from splitinfer.models import build_default
from splitinfer.plan import InputSpec
from splitinfer.staged import stage_model


@pytest.fixture(scope="module")
def staged():
    torch.manual_seed(0)
    return stage_model(build_default().eval(), torch.zeros(1, 1, 28, 28))


def test_size_rule_reproduces_the_committed_codec_and_keeps_explicit_values():
    committed = load_default_bottleneck()[0].cfg
    rule = BottleneckConfig.for_boundary(6, [48, 14, 14], bits=2)
    assert rule == committed  # stride 2, hidden 48, 8 channels
    assert BottleneckConfig.for_boundary(8, (48, 14, 14), bits=3, channels=8, hidden=64, stride=2) == \
        BottleneckConfig(boundary=8, in_shape=(48, 14, 14))  # the old command-line defaults, given explicitly
    small = BottleneckConfig.for_boundary(3, [512, 7, 7])
    assert (small.stride, small.hidden, small.channels) == (1, 64, 21)
    assert BottleneckConfig.for_boundary(3, [16, 32, 32], stride=4).channels == 11  # 16 * 16 / 24
    narrow = BottleneckConfig.for_boundary(3, [8, 16, 16])
    assert (narrow.hidden, narrow.channels) == (16, 4)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        BottleneckConfig.for_boundary(3, [512])


def test_match_boundary_is_nearer_only_when_much_cheaper(staged):
    from partitioner.target import load_target

    s = load_target("resnet18", input_shape=[3, 64, 64]).staged
    n = s.num_stages
    assert match_boundary(s, 5) == 21  # the last [C, H, W] boundary: full distillation
    near = match_boundary(s, 5, DEFAULT_MAX_TAIL_COST)
    assert 5 < near < 21 and 0 < tail_cost(s, 5, near) <= DEFAULT_MAX_TAIL_COST
    assert tail_cost(s, 5, near) * 2 <= tail_cost(s, 5, n)
    assert tail_cost(s, 5, n) == s.macs_between(5, n) + 256 * sum(s.boundaries[i].numel for i in range(6, n + 1))
    assert match_boundary(s, 13, DEFAULT_MAX_TAIL_COST) == 21  # a nearer one would save less than half
    assert match_boundary(s, 17, DEFAULT_MAX_TAIL_COST) == 21  # the tail is within the cap
    # the default model keeps full distillation at every boundary (its committed codec's recipe)
    for k in (1, 3, 6, 8, 11):
        assert match_boundary(staged, k, DEFAULT_MAX_TAIL_COST) == match_boundary(staged, k)


@pytest.mark.slow
def test_features_recomputed_per_batch_give_the_same_bottleneck(staged):
    cfg = BottleneckConfig.for_boundary(6, staged.boundaries[6].shape, bits=2, hidden=16)
    x = torch.randn(64, 1, 28, 28)
    dcfg = DistillConfig(epochs_float=1, epochs_qat=1, batch_size=32)
    a, ra = train_bottleneck(staged, cfg, x, dcfg, progress=False)
    b, rb = train_bottleneck(staged, cfg, x, DistillConfig(**{**dcfg.__dict__, "cache_mb": 0}), progress=False)
    assert rb["cache"]["features"] is False and "cache" not in ra
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)


def test_nearer_match_trains_on_features_only(staged):
    cfg = BottleneckConfig.for_boundary(6, staged.boundaries[6].shape, bits=2, hidden=16)
    bn, report = train_bottleneck(staged, cfg, torch.randn(64, 1, 28, 28),
                                  DistillConfig(epochs_float=1, epochs_qat=0, batch_size=32, max_tail_cost=12_000_000),
                                  progress=False)
    assert report["match"] == "features" and report["match_boundary"] < match_boundary(staged, 6)
    assert report["match_cost"] <= 12_000_000 and report["tail_cost"] > 2 * report["match_cost"]


def test_time_budget_cuts_epochs_and_skips_what_does_not_fit(staged):
    x, xt = torch.randn(64, 1, 28, 28), torch.randn(16, 1, 28, 28)
    y = np.zeros(16, dtype=np.int64)
    said: list[str] = []
    saved: list[int] = []
    results = train_bottlenecks(staged, [6, 8, 11], x, xt, y, bits=2, hidden=16,
                                dcfg=DistillConfig(epochs_float=2, epochs_qat=2, batch_size=16), budget_s=0.2,
                                teacher_weights="random", progress=False, echo=said.append,
                                on_result=lambda bn, r: saved.append(r["boundary"]))
    assert 1 <= len(results) < 3 and saved == [r["boundary"] for _, r in results]
    first = results[0][1]
    assert first["stopped_early"] and first["budget"]["stopped_early"]
    assert sum(h.get("images", 64) for h in first["history"]) < 4 * 64  # epochs shortened or cut
    last = results[-1][1]
    assert last["budget"]["not_trained"] == [6, 8, 11][len(results):]
    assert said and "time budget" in said[0]
    # a random teacher: no accuracy even with labels, and the report says what the figure is
    assert "accuracy" not in first["test"] and "random teacher" in first["note"]
    with pytest.raises(ValueError, match="boundary 15 is not an interior"):  # [96] vector
        train_bottlenecks(staged, [15], x, xt, None, bits=2)


def test_normalised_images_replicate_grey_and_index_like_a_tensor():
    imgs = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    x = NormalisedImages(imgs, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    assert len(x) == 3 and x.shape == (3, 3, 4, 4)
    batch = x[torch.tensor([2, 0])]
    assert batch.shape == (2, 3, 4, 4) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0, 1], (torch.from_numpy(imgs[2]).float() / 255 - 0.4) / 0.2)
    assert x[1:3].shape == (2, 3, 4, 4) and x[0].shape == (1, 3, 4, 4)


def test_image_folder_holds_out_test_images_and_maps_labels_by_name(tmp_path):
    for cls, value in (("Bag", 10), ("Coat", 200)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((10, 12), value + i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    spec = InputSpec(shape=[1, 8, 8], mean=[0.5], std=[0.25], labels=["T-shirt/top", "Coat", "Bag"])
    split = image_folder_inputs(tmp_path, spec, seed=1)
    assert (len(split.x_train), len(split.x_test)) == (8, 2)
    assert split.x_train[0:1].shape == (1, 1, 8, 8)
    assert set(split.y_test.tolist()) <= {1, 2}  # "Bag" -> 2, "Coat" -> 1 (the model's indices)
    other = InputSpec(shape=[3, 8, 8], mean=[0.5] * 3, std=[0.25] * 3, labels=["a", "b"])
    split = image_folder_inputs(tmp_path, other, seed=1, train_limit=3, test_limit=1)
    assert split.y_test is None and "agreement only" in split.note
    assert (len(split.x_train), len(split.x_test)) == (3, 1) and split.x_test[0:1].shape == (1, 3, 8, 8)


def test_committed_codec_is_read_under_the_old_and_the_new_name(tmp_path):
    src = weights_dir()
    stem = "default_bottleneck_6" if (src / "default_bottleneck_6.json").is_file() else "default_bottleneck"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(src / f"{stem}{suffix}", legacy / f"default_bottleneck{suffix}")
    bn, info = load_default_bottleneck(legacy)
    assert bn.cfg.boundary == 6 and sorted(load_bottlenecks(legacy, "default")) == [6]
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(src / f"{stem}{suffix}", renamed / f"default_bottleneck_6{suffix}")
    bn2, info2 = load_default_bottleneck(renamed)
    assert bn2.cfg == bn.cfg and info2["sha256"] == info["sha256"]
    # a new file wins over the old name at the same boundary; another boundary is found too
    save_bottleneck(legacy, bn, {**info, "marker": "new"}, "default")
    other = BottleneckConfig.for_boundary(8, [48, 14, 14], bits=2)
    from splitinfer.bottleneck import Bottleneck

    save_bottleneck(legacy, Bottleneck(other).eval(), {"config": other.to_params(), "model": "default"}, "default")
    found = load_bottlenecks(legacy, "default")
    assert sorted(found) == [6, 8] and found[6][1]["marker"] == "new"
    assert load_default_bottleneck(legacy)[0].cfg.boundary == 6
    assert load_default_bottleneck(legacy, boundary=8)[0].cfg.boundary == 8
    bad = json.loads((legacy / "default_bottleneck_8.json").read_text())
    bad["config"]["in_shape"] = "96,7,7"
    (legacy / "default_bottleneck_8.json").write_text(json.dumps(bad))
    from splitinfer.errors import BundleError

    with pytest.raises(BundleError, match="boundary 8 is \\[48, 14, 14\\]"):
        load_bottlenecks(legacy, "default")
