"""The profiler on real models: totals against torchvision's published figures, the CLI's JSON, profile files."""

import json

import pytest
from typer.testing import CliRunner

from partitioner.cli import app
from partitioner.profile import Profile, load_profile, profile_model, save_profile
from partitioner.target import load_target
from splitinfer.codec import get_codec
from splitinfer.errors import BundleError

pytestmark = pytest.mark.slow  # profiles torchvision models (about 12 s)

pytest.importorskip("torchvision")

# torchvision's model cards: parameters and GFLOPS (which count multiply-accumulates) at 224x224
PUBLISHED = {
    "resnet18": (11_689_512, 1.814e9),
    "resnet50": (25_557_032, 4.089e9),
    "mobilenet_v2": (3_504_872, 0.301e9),
    "mobilenet_v3_large": (5_483_032, 0.217e9),
    "efficientnet_b0": (5_288_548, 0.386e9),
    "vgg16": (138_357_544, 15.47e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_profiler_totals_match_torchvision(name):
    target = load_target(name)
    prof = profile_model(target.staged, {}, get_codec("uint8-affine"), target.example(), repeats=1, warmup=0,
                         codec_repeats=1, model_name=name)
    params, macs = PUBLISHED[name]
    d = prof.to_dict()
    assert d["total_params"] == params
    assert d["total_macs"] == pytest.approx(macs, rel=0.01)
    assert len(prof.stage_ms) == target.staged.num_stages == len(prof.stage_macs)
    assert prof.head_peak_bytes[0] == 0 and prof.head_peak_bytes[-1] >= 4 * params  # all weights on the edge
    assert prof.head_peak_bytes == sorted(prof.head_peak_bytes)


def test_profile_cli_json_and_file_roundtrip(tmp_path):
    out = tmp_path / "p.json"
    res = CliRunner().invoke(app, ["profile", "--model", "mobilenet_v2", "--repeats", "2",
                                   "--batch-sizes", "1,2,4", "--threads", "1", "--out", str(out), "--json",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["total_params"] == 3_504_872 and d["total_macs"] == pytest.approx(0.301e9, rel=0.01)
    assert d["threads"] == 1 and d["machine"] and d["torch_version"]
    assert sorted(d["batch_stage_ms"]) == ["2", "4"]
    assert len(d["stage_ms_stats"]) == len(d["stage_ms"])
    prof = load_profile(out)
    assert prof.to_dict() == d
    # a whole batch of 4 takes at least as long as one sample, stage by stage in total
    assert sum(prof.batch_stage_ms[4]) > sum(prof.stage_ms)
    assert prof.server_stage_ms(3) == pytest.approx(
        [(a + b) / 2 for a, b in zip(prof.batch_stage_ms[2], prof.batch_stage_ms[4], strict=True)])


def test_broken_profiles_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BundleError, match="cannot read profile"):
        load_profile(bad)
    with pytest.raises(BundleError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    target = load_target("default")
    prof = profile_model(target.staged, target.exits, get_codec("uint8-affine"), target.example(), repeats=1,
                         warmup=0, codec_repeats=1)
    d = prof.to_dict()
    d["encode_ms"] = d["encode_ms"][:-1]
    bad.write_text(json.dumps(d))
    with pytest.raises(BundleError, match="encode_ms"):
        load_profile(bad)
    save_profile(prof, tmp_path / "ok.json")
    other = load_target("resnet18")
    with pytest.raises(ValueError, match="another model"):
        load_profile(tmp_path / "ok.json").check_matches(other.staged)
    assert isinstance(Profile.from_dict(prof.to_dict()), Profile)
