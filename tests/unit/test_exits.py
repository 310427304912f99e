import torch

from splitinfer.exits import ExitHead, train_exits
from splitinfer.models import build_default
from splitinfer.staged import stage_model


def test_train_exits_distills_towards_the_full_model():
    torch.manual_seed(0)
    staged = stage_model(build_default().eval(), torch.zeros(1, 1, 28, 28))
    x = torch.randn(256, 1, 28, 28)
    heads = train_exits(staged, [4, 8], x, num_classes=10, epochs=2, batch_size=64, progress=False)
    assert set(heads) == {4, 8}
    for h in heads.values():
        assert isinstance(h, ExitHead) and not h.training
        assert h.macs() > 0
    with torch.inference_mode():
        out = heads[8](staged.run(x[:4], 0, 8))
    assert out.shape == (4, 10)


def test_exit_heads_are_cheap_relative_to_the_default_model():
    staged = stage_model(build_default().eval(), torch.zeros(1, 1, 28, 28))
    total = staged.macs_between(0, staged.num_stages)
    for b in (3, 6, 8, 11):
        head = ExitHead(staged.boundaries[b].shape, 10)
        assert head.macs() < 0.07 * total
        assert head(torch.zeros(2, *staged.boundaries[b].shape)).shape == (2, 10)
