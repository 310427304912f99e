"""A bundle carrying several learned codecs (one file each, codec_<boundary>.safetensors, hashed and pickle-checked
like every bundle file), and an old bundle with its one codec in codec.safetensors still loading."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from splitinfer.bottleneck import Bottleneck, BottleneckConfig
from splitinfer.bundle import LEGACY_CODEC_FILE, load_bundle, read_plan, save_bundle
from splitinfer.errors import BundleError, InvalidInput
from tests.support.bundles import LEARNED_SPLIT, MULTI_CODEC_BOUNDARIES, make_multi_codec_bundle

A, B = MULTI_CODEC_BOUNDARIES  # 3: [32, 28, 28], 6: [48, 14, 14]


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory):
    return make_multi_codec_bundle(tmp_path_factory.mktemp("multi") / "b")


@pytest.fixture(scope="module")
def multi(multi_dir):
    return load_bundle(multi_dir)


def test_round_trip_with_two_learned_codecs(multi_dir, multi):
    files = {f.name for f in multi_dir.iterdir()}
    assert {f"codec_{A}.safetensors", f"codec_{B}.safetensors"} <= files and LEGACY_CODEC_FILE not in files
    assert {f"codec_{A}.safetensors", f"codec_{B}.safetensors"} <= set(multi.plan.files)
    assert sorted(multi.learned_codecs) == [A, B] == multi.plan.learned_boundaries()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    for b in (A, B):
        lc = multi.learned_codec_at(b)
        assert lc.boundary == b and list(lc.cfg.in_shape) == multi.plan.boundaries[b].shape
        assert multi.codec_for("bottleneck", b) is lc
        with torch.inference_mode():
            feats = multi.staged.run(x.clone(), 0, b)
        payload, meta = lc.encode(feats)
        assert lc.decode(payload, meta).shape == feats.shape
        # the weights on disk are the ones loaded
        bn = Bottleneck.from_state(BottleneckConfig.from_params(multi.plan.learned_codec_at(b).params),
                                   _read(multi_dir / f"codec_{b}.safetensors"))
        torch.testing.assert_close(bn.tables, lc.bottleneck.tables)
    assert multi.learned_codec_at(4) is None


def _read(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_codec_for_picks_the_codec_at_the_split_and_names_the_boundaries(multi):
    assert multi.codec_for("bottleneck", A) is not multi.codec_for("bottleneck", B)
    with pytest.raises(InvalidInput, match=f"works at boundaries {A}, {B} only, not at split 4"):
        multi.codec_for("bottleneck", 4)
    with pytest.raises(InvalidInput, match="name the split"):
        multi.codec_for("bottleneck")
    assert multi.codec_for("uint8-affine", 4).name == "uint8-affine"


def test_save_bundle_needs_exactly_the_plans_codec_weights(multi, tmp_path):
    plan = multi.plan
    states = {b: lc.bottleneck.state_for_bundle() for b, lc in multi.learned_codecs.items()}
    model = multi.staged.model
    for bad in (None, {A: states[A]}, {**states, 4: states[A]}):
        with pytest.raises(BundleError, match="codec_states"):
            save_bundle(tmp_path / "x", plan, model, multi.exits, codec_states=bad)
    # rewriting a bundle with one codec fewer removes the stale file
    d = tmp_path / "rewrite"
    save_bundle(d, plan, model, multi.exits, codec_states=states)
    one = plan.model_copy(update={"learned_codecs": [plan.learned_codec_at(B)], "operating_points": [
        p for p in plan.operating_points if p.split == B]})
    save_bundle(d, one, model, multi.exits, codec_states={B: states[B]})
    assert not (d / f"codec_{A}.safetensors").exists() and (d / f"codec_{B}.safetensors").exists()
    assert sorted(load_bundle(d).learned_codecs) == [B]


def test_each_codec_file_is_hash_checked_and_pickles_refused(multi_dir, tmp_path):
    d = tmp_path / "flipped"
    shutil.copytree(multi_dir, d)
    data = bytearray((d / f"codec_{A}.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (d / f"codec_{A}.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"codec_{A}.safetensors is corrupted"):
        load_bundle(d)
    d = tmp_path / "pickled"
    shutil.copytree(multi_dir, d)
    (d / f"codec_{B}.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(d)
    d = tmp_path / "unlisted"
    shutil.copytree(multi_dir, d)
    plan = json.loads((d / "plan.json").read_text())
    del plan["files"][f"codec_{B}.safetensors"]
    (d / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match=f"at boundary {B} but lists no codec_{B}.safetensors"):
        load_bundle(d)


def test_an_old_bundle_with_codec_safetensors_still_loads(learned_bundle_dir, tmp_path):
    """A bundle written before several learned codecs: plan.json holds ``learned_codec`` (one spec) and the
    weights are in ``codec.safetensors``."""
    d = tmp_path / "old"
    shutil.copytree(learned_bundle_dir, d)
    new_name = f"codec_{LEARNED_SPLIT}.safetensors"
    (d / new_name).rename(d / LEGACY_CODEC_FILE)
    plan = json.loads((d / "plan.json").read_text())
    plan["learned_codec"] = plan.pop("learned_codecs")[0]
    plan["files"][LEGACY_CODEC_FILE] = plan["files"].pop(new_name)
    (d / "plan.json").write_text(json.dumps(plan))

    old = load_bundle(d)
    new = load_bundle(learned_bundle_dir)
    assert sorted(old.learned_codecs) == [LEARNED_SPLIT]
    assert read_plan(d).learned_codec_file(LEARNED_SPLIT) == LEGACY_CODEC_FILE
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        feats = new.staged.run(x, 0, LEARNED_SPLIT)
    assert old.codec_for("bottleneck", LEARNED_SPLIT).encode(feats) == new.learned_codecs[LEARNED_SPLIT].encode(feats)
    data = bytearray((d / LEGACY_CODEC_FILE).read_bytes())  # the legacy file is hash-checked too
    data[-5] ^= 0xFF
    (d / LEGACY_CODEC_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="codec.safetensors is corrupted"):
        load_bundle(d)
