"""Plan rules for learned codecs: any number, one per interior boundary; a learned codec applies only where the
plan carries one; plans written with the old single ``learned_codec`` field still read."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from splitinfer.errors import BundleError
from splitinfer.plan import LEGACY_CODEC_FILE, Plan, codec_file, read_plan

N_BOUNDARIES = 8  # boundaries 0..7: 1..6 are interior


def _codec(boundary: int, channels: int = 4) -> dict:
    return {"name": "bottleneck", "params": {"boundary": boundary, "in_shape": "8,4,4", "channels": channels,
                                             "bits": 2, "stride": 2, "hidden": 16, "coder": "ans"}}


def _raw(**over) -> dict:
    raw = {
        "created": "2024-01-01T00:00:00+00:00",
        "model": {"name": "toy", "num_classes": 2, "params": 10},
        "input": {"shape": [1, 4, 4], "mean": [0.0], "std": [1.0], "labels": ["a", "b"]},
        "boundaries": [{"index": i, "node": f"n{i}", "shape": [8, 4, 4], "fp32_bytes": 512}
                       for i in range(N_BOUNDARIES)],
        "stages": [{"index": i, "macs": 1, "params": 1} for i in range(N_BOUNDARIES - 1)],
        "split": 3,
        "codec": {"name": "uint8-affine"},
    }
    raw.update(over)
    return raw


def _point(split: int, codec: str) -> dict:
    return {"bandwidth_bps": 1e6, "rtt_ms": 10.0, "split": split, "codec": codec, "exits": [],
            "expected_latency_ms": 1.0, "expected_bytes": 100.0}


def test_several_learned_codecs_each_apply_at_their_own_boundary():
    plan = Plan.model_validate(_raw(split=5, codec={"name": "bottleneck"}, learned_codecs=[_codec(5), _codec(2)],
                                    operating_points=[_point(2, "bottleneck"), _point(4, "uint8-affine")]))
    assert plan.learned_boundaries() == [2, 5]  # sorted by boundary
    assert [int(c.params["boundary"]) for c in plan.learned_codecs] == [2, 5]
    assert plan.learned_codec_at(2).params["boundary"] == 2 and plan.learned_codec_at(5).params["boundary"] == 5
    assert plan.learned_codec_at(3) is None
    assert plan.codec_applies("bottleneck", 2) and plan.codec_applies("bottleneck", 5)
    assert not plan.codec_applies("bottleneck", 3) and not plan.codec_applies("bottleneck", 0)
    assert plan.codec_applies("uint8-affine", 3) and plan.codec_applies("image", 0)
    assert not plan.codec_applies("image", 2)
    # the plan's codec where it applies, uint8-affine elsewhere; an explicit codec wins
    assert [plan.codec_at(k) for k in (2, 3, 5)] == ["bottleneck", "uint8-affine", "bottleneck"]
    assert plan.codec_at(3, "float32") == "float32"
    assert plan.learned_codec_file(2) == codec_file(2) == "codec_2.safetensors"
    again = Plan.model_validate_json(plan.model_dump_json())
    assert again == plan and "learned_codec" not in json.loads(plan.model_dump_json())


def test_no_learned_codec_by_default():
    plan = Plan.model_validate(_raw())
    assert plan.learned_codecs == [] and plan.learned_boundaries() == []
    assert plan.learned_codec_at(3) is None and not plan.codec_applies("bottleneck", 3)


@pytest.mark.parametrize("legacy, boundaries", [(_codec(4), [4]), (None, [])])
def test_legacy_plan_json_with_learned_codec_still_reads(tmp_path, legacy, boundaries):
    raw = _raw(learned_codec=legacy)
    if legacy is not None:
        raw.update(split=4, codec={"name": "bottleneck"}, files={LEGACY_CODEC_FILE: "0" * 64})
    (tmp_path / "plan.json").write_text(json.dumps({"format": "splitinfer-plan", "version": 1, **raw}))
    plan = read_plan(tmp_path)
    assert plan.learned_boundaries() == boundaries
    assert not hasattr(plan, "learned_codec")
    if legacy is not None:
        assert plan.codec_applies("bottleneck", 4) and plan.codec_at(4) == "bottleneck"
        assert plan.learned_codec_file(4) == LEGACY_CODEC_FILE  # an old bundle's one codec file
    # written back, it uses the new field only
    assert "learned_codec" not in json.loads(plan.model_dump_json())


def test_legacy_and_new_field_together_are_refused():
    with pytest.raises(ValidationError, match="both learned_codec"):
        Plan.model_validate(_raw(learned_codec=_codec(4), learned_codecs=[_codec(2)]))


@pytest.mark.parametrize("over, match", [
    ({"split": 4, "codec": {"name": "bottleneck"}, "learned_codecs": [_codec(2), _codec(6)]},
     "works at boundaries 2, 6 only; the plan uses it at split 4"),
    ({"split": 4, "codec": {"name": "bottleneck"}, "learned_codecs": [_codec(2)]},
     "works at boundary 2 only; the plan uses it at split 4"),
    ({"learned_codecs": [_codec(2), _codec(6)], "operating_points": [_point(5, "bottleneck")]},
     "boundaries 2, 6 only; the plan uses it at split 5"),
    ({"split": 4, "codec": {"name": "bottleneck"}}, "does not carry"),
    ({"learned_codecs": [_codec(2), _codec(2, channels=8)]}, "repeat"),
    ({"learned_codecs": [_codec(0)]}, "not an interior boundary"),
    ({"learned_codecs": [_codec(N_BOUNDARIES - 1)]}, "not an interior boundary"),
    ({"learned_codecs": [{"name": "gzip", "params": _codec(2)["params"]}]}, "unknown learned codec"),
    ({"learned_codecs": [{"name": "bottleneck", "params": {"boundary": 2}}]}, "incomplete or invalid"),
])
def test_inconsistent_learned_codecs_are_refused(over, match):
    with pytest.raises(ValidationError, match=match):
        Plan.model_validate(_raw(**over))


def test_read_plan_names_the_boundaries_it_has(tmp_path):
    raw = _raw(split=4, codec={"name": "bottleneck"}, learned_codecs=[_codec(3), _codec(5)])
    (tmp_path / "plan.json").write_text(json.dumps({"format": "splitinfer-plan", "version": 1, **raw}))
    with pytest.raises(BundleError, match="boundaries 3, 5 only"):
        read_plan(tmp_path)
