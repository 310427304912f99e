"""Head compression: int8 quantization per segment and stage-internal structured pruning with distillation."""

from __future__ import annotations

import pytest
import torch

from splitinfer.compression.int8 import int8_head
from splitinfer.compression.prune import distill_head, prune_head
from splitinfer.models import build_default
from splitinfer.staged import stage_model

EXAMPLE = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_default()
    m.train()
    with torch.no_grad():  # give batch norm realistic running statistics
        for _ in range(5):
            m(torch.randn(64, 1, 28, 28))
    return m.eval()


def test_int8_head_follows_the_fp32_head_and_keeps_exit_boundaries_float(model):
    staged = stage_model(model, EXAMPLE)
    calib = torch.randn(128, 1, 28, 28)
    head = int8_head(staged, 8, calib, cuts=[3, 6, 12])
    assert head.cuts == [0, 3, 6, 8]  # cuts beyond the split are ignored
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = staged.run(x, 0, 8)
        out = head(x)
        mid = head.run(x, 0, 3)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 0.1
    assert mid.shape == (16, *staged.boundaries[3].shape)
    assert any(".quantized." in type(m).__module__ for m in head.modules())  # real int8 kernels, not fake quant


def test_pruning_removes_only_stage_internal_channels(model):
    pruned, report = prune_head(model, EXAMPLE, split=8, ratio=0.67)
    staged = stage_model(model, EXAMPLE)
    after = stage_model(pruned, EXAMPLE)
    assert [b.shape for b in after.boundaries] == [b.shape for b in staged.boundaries]
    assert [p["module"] for p in report["pruned"]] == ["2.conv1.0"]  # the residual block's inner convolution
    assert report["mac_reduction"] >= 0.40
    assert report["head_macs_after"] == after.macs_between(0, 8)
    assert after.macs_between(8, after.num_stages) == staged.macs_between(8, staged.num_stages)  # tail untouched
    assert sum(p.numel() for p in model.parameters()) == report["params_before"]  # the original is not modified
    with pytest.raises(ValueError):
        prune_head(model, EXAMPLE, split=8, ratio=1.0)


def test_distillation_fine_tunes_only_the_head(model):
    pruned, _ = prune_head(model, EXAMPLE, split=8, ratio=0.5)
    student = stage_model(pruned, EXAMPLE)
    teacher = stage_model(model, EXAMPLE)
    tail_before = {k: v.clone() for k, v in pruned.state_dict().items() if k.startswith(("3.", "4.", "5."))}
    head_before = pruned[2].conv1[0].weight.clone()
    x = torch.randn(256, 1, 28, 28)
    report = distill_head(student, teacher, 8, x, epochs=2, batch_size=64)
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert not torch.equal(head_before, pruned[2].conv1[0].weight)
    for k, v in pruned.state_dict().items():
        if k in tail_before:
            assert torch.equal(v, tail_before[k]), k


def test_pruning_takes_a_ratio_per_layer(model):
    split = 13  # through the 7x7 residual block: two stage-internal convolutions
    pruned, report = prune_head(model, EXAMPLE, split=split, ratio={"2.conv1.0": 0.75, "4.conv1.0": 0.25})
    got = {p["module"]: (p["channels_before"], p["channels_after"]) for p in report["pruned"]}
    assert got == {"2.conv1.0": (48, 12), "4.conv1.0": (96, 72)}
    _, only = prune_head(model, EXAMPLE, split=split, ratio={"4.conv1.0": 0.5})
    assert [p["module"] for p in only["pruned"]] == ["4.conv1.0"]
    with pytest.raises(ValueError, match="ratio"):
        prune_head(model, EXAMPLE, split=split, ratio={"4.conv1.0": 1.0})
