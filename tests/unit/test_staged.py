"""Head/tail equality at every boundary, for the default model and five torchvision models."""

import pytest
import torch
from torch import nn

from splitinfer.models import build_model, example_input
from splitinfer.staged import stage_model

MODELS = ["default", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]


@pytest.mark.parametrize("name", MODELS)
def test_tail_of_head_equals_model_exactly_at_every_boundary(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = example_input(name, batch=2, size=64)
    staged = stage_model(model, x)
    assert staged.num_stages >= 5
    with torch.inference_mode():
        ref = model(x)
        for k in range(staged.num_stages + 1):
            mid = staged.head(k)(x)
            assert list(mid.shape[1:]) == staged.boundaries[k].shape
            out = staged.tail(k)(mid)
            assert (out - ref).abs().max().item() == 0.0, f"split {k} differs"
    assert sum(s.params for s in staged.stage_info) == sum(p.numel() for p in model.parameters())
    assert all(s.macs >= 0 for s in staged.stage_info)
    assert sum(s.macs for s in staged.stage_info) > 0


def test_default_model_boundaries_and_macs():
    model = build_model("default").eval()
    staged = stage_model(model, example_input("default"))
    assert staged.boundaries[0].shape == [1, 28, 28]
    assert staged.boundaries[-1].shape == [10]
    assert [48, 14, 14] in [b.shape for b in staged.boundaries]
    assert sum(p.numel() for p in model.parameters()) <= 500_000
    # conv 3x3, 1->32 at 28x28 has 28*28*32*9 MACs
    assert staged.stage_info[0].macs == 28 * 28 * 32 * 9


def test_residual_block_is_not_cut_inside():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return y + self.c(self.b(y))

    staged = stage_model(Net().eval(), torch.randn(1, 3, 8, 8))
    # boundaries: input, after a, output; never between b and c while y is live
    assert [b.node for b in staged.boundaries] == ["x", "a", "add"]


def test_untraceable_and_multi_output_models_are_refused():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be traced
                return x
            return -x

    with pytest.raises(ValueError, match="fx-traceable"):
        stage_model(Branchy(), torch.randn(1, 3))

    class TwoOut(nn.Module):
        def forward(self, x):
            return x, x * 2

    with pytest.raises(ValueError):
        stage_model(TwoOut(), torch.randn(1, 3))


def test_split_out_of_range():
    staged = stage_model(build_model("default").eval(), example_input("default"))
    with pytest.raises(IndexError):
        staged.head(staged.num_stages + 1)
    with pytest.raises(IndexError):
        staged.run(torch.zeros(1), 3, 2)
