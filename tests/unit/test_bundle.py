import json
import pickle
import shutil

import pytest
import torch

from splitinfer.bundle import load_bundle, read_plan
from splitinfer.errors import BundleError
from tests.support.bundles import TEST_EXITS, TEST_SPLIT, make_test_bundle


@pytest.fixture
def bundle(tmp_path):
    return make_test_bundle(tmp_path / "b")


def test_roundtrip_preserves_plan_weights_and_exits(bundle):
    b = load_bundle(bundle)
    assert b.plan.split == TEST_SPLIT
    assert sorted(b.exits) == list(TEST_EXITS)
    torch.manual_seed(0)
    from splitinfer.models import build_default

    ref = build_default().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(b.staged(x), ref(x))
    assert [s.shape for s in b.plan.boundaries] == [s.shape for s in b.staged.boundaries]


def test_planted_pickle_is_refused(bundle):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (bundle / "extra.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(bundle)


def test_pickle_in_place_of_weights_is_refused(bundle):
    torch.save({"x": torch.zeros(1)}, bundle / "model.safetensors")  # torch.save = zip with data.pkl
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(bundle)


def test_corrupted_weights_refused(bundle):
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bundle / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupted"):
        load_bundle(bundle)


def test_truncated_weights_refused(bundle):
    data = (bundle / "exits.safetensors").read_bytes()
    (bundle / "exits.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError):
        load_bundle(bundle)


def test_corrupted_plan_json_refused(bundle):
    (bundle / "plan.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle)


def test_schema_violation_and_version_refused(bundle):
    plan = json.loads((bundle / "plan.json").read_text())
    plan["split"] = "deep"
    (bundle / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match="schema"):
        load_bundle(bundle)
    plan["split"] = 3
    plan["version"] = 99
    (bundle / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match="version"):
        read_plan(bundle)


def test_missing_directory_and_file(tmp_path, bundle):
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "nope")
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "exits.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy)


@pytest.mark.parametrize("edit, match", [
    (lambda p: p["input"].update(shape=[2, 28, 28], mean=[0.1, 0.1], std=[0.3, 0.3]), "cannot run model"),
    (lambda p: p["input"].update(shape=[1, -28, 28]), "positive"),
    (lambda p: p["input"].update(shape=[1, 100000, 100000]), "exceeds"),
    (lambda p: p["input"].update(std=[0.0]), "std positive"),
    (lambda p: p["input"].update(mean=[0.1, 0.2]), "per channel"),
    (lambda p: p["input"].update(labels=["a", "b"]), "labels"),
    (lambda p: p["exits"].append(dict(p["exits"][0])), "repeat"),
    (lambda p: p["exits"][0].update(hidden=10**9), "schema"),
    (lambda p: p["codec"].update(name="gzip"), "unknown codec"),
    (lambda p: p["model"].update(factory="os:abort"), "explicit trust"),
    (lambda p: p.update(active_exits=[99]), "enables exits"),
    (lambda p: p.update(active_exits=[], active_exit_rates={"4": 0.5}), "not active"),
])
def test_inconsistent_plan_is_refused_with_a_bundle_error(bundle, edit, match):
    plan = json.loads((bundle / "plan.json").read_text())
    edit(plan)
    (bundle / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle)


def test_trusted_factory_must_return_a_module(bundle, monkeypatch):
    plan = json.loads((bundle / "plan.json").read_text())
    plan["model"]["factory"] = "builtins:object"
    (bundle / "plan.json").write_text(json.dumps(plan))
    monkeypatch.setenv("SPLITINFER_TRUST_MODEL_FACTORY", "1")
    with pytest.raises(BundleError, match="not an nn.Module"):
        load_bundle(bundle)


def test_loading_a_bundle_takes_the_macs_from_the_plan_and_enters_no_dispatch_mode(bundle_dir):
    """Counting MACs (a torch dispatch mode) imports torch's compiler stack, ~160 MB of RSS: a process that only
    loads and runs a bundle (the edge agent, the server) must not; the stage MACs come from plan.json."""
    import subprocess
    import sys

    code = ("import sys, torch; from splitinfer.bundle import load_bundle; "
            f"b = load_bundle({str(bundle_dir)!r}); b.staged.run(torch.zeros(1, *b.plan.input.shape), 0, "
            "b.staged.num_stages); print('torch._dynamo' in sys.modules, [s.macs for s in b.staged.stage_info] == "
            "[s.macs for s in b.plan.stages], b.staged.macs_between(0, b.staged.num_stages) > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]
