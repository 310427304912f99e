import torch

from partitioner.weights import load_default
from splitinfer.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from splitinfer.exits import ExitHead, train_exits
from splitinfer.models import build_default
from splitinfer.staged import stage_model

EXITS = [4, 8]


def rectangles(n: int, seed: int) -> torch.Tensor:
    """Normalised 28x28 inputs: one filled rectangle of random size, place and brightness on black. The trained
    default model gives them several different answers (trousers, dress, sandal, bag, ...), with confident
    logits: a target that exit heads can be seen to learn in a few seconds."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        h, w = torch.randint(4, 27, (2,), generator=g).tolist()
        top = int(torch.randint(0, 28 - h + 1, (1,), generator=g))
        left = int(torch.randint(0, 28 - w + 1, (1,), generator=g))
        img[i, 0, top : top + h, left : left + w] = 0.3 + 0.7 * float(torch.rand(1, generator=g))
    return (img - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def agreement(staged, heads: dict[int, ExitHead], x: torch.Tensor, full: torch.Tensor) -> dict[int, float]:
    """Per exit: the fraction of ``x`` on which the exit's answer is the full model's."""
    with torch.inference_mode():
        return {b: float((h.eval()(staged.run(x, 0, b)).argmax(1) == full).float().mean()) for b, h in heads.items()}


def test_train_exits_distills_towards_the_full_model():
    _, staged, _, _ = load_default()  # the committed weights: a full model with confident, varied answers
    x, held_out = rectangles(256, seed=1), rectangles(256, seed=2)
    with torch.inference_mode():
        full = staged.run(held_out, 0, staged.num_stages).argmax(1)
    majority = float(torch.bincount(full, minlength=10).max()) / len(full)
    assert majority < 0.75, "the held-out answers must vary for agreement to mean anything"

    torch.manual_seed(0)  # the heads train_exits starts from (it seeds, then builds them in this order)
    untrained = {b: ExitHead(staged.boundaries[b].shape, 10) for b in EXITS}
    heads = train_exits(staged, EXITS, x, num_classes=10, epochs=2, batch_size=16, lr=1e-2, seed=0, progress=False)
    assert set(heads) == set(EXITS)
    for h in heads.values():
        assert isinstance(h, ExitHead) and not h.training
        assert h.macs() > 0
    with torch.inference_mode():
        assert heads[8](staged.run(held_out[:4], 0, 8)).shape == (4, 10)

    before = agreement(staged, untrained, held_out, full)
    after = agreement(staged, heads, held_out, full)
    for b in EXITS:
        # On inputs it was not trained on, each exit agrees with the full model far more after training than
        # before, and more than always giving the full model's most common answer would.
        assert after[b] >= before[b] + 0.3, (b, before, after)
        assert after[b] > majority + 0.05, (b, majority, after)


def test_exit_heads_are_cheap_relative_to_the_default_model():
    staged = stage_model(build_default().eval(), torch.zeros(1, 1, 28, 28))
    total = staged.macs_between(0, staged.num_stages)
    for b in (3, 6, 8, 11):
        head = ExitHead(staged.boundaries[b].shape, 10)
        assert head.macs() < 0.07 * total
        assert head(torch.zeros(2, *staged.boundaries[b].shape)).shape == (2, 10)
