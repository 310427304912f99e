import numpy as np
import torch

from splitinfer.exits import ExitHead, choose_thresholds, simulate, train_exits
from splitinfer.models import build_default
from splitinfer.staged import stage_model


def test_simulate_first_confident_exit_answers():
    conf = {2: np.array([0.9, 0.1, 0.1]), 5: np.array([0.1, 0.95, 0.2])}
    pred = {2: np.array([1, 0, 0]), 5: np.array([0, 2, 0])}
    full = np.array([1, 3, 4])
    d = simulate({2: 0.5, 5: 0.5}, conf, pred, full)
    assert d.exit_rates == {2: 1 / 3, 5: 1 / 3}
    assert abs(d.agreement - 2 / 3) < 1e-9  # sample 1 exits at 5 with a wrong answer


def test_choose_thresholds_respects_budget():
    rng = np.random.default_rng(0)
    n = 2000
    full = rng.integers(0, 10, n)
    conf, pred = {}, {}
    for b in (3, 7):
        c = rng.random(n)
        # confident answers agree with the full model, unconfident ones often do not
        p = np.where(rng.random(n) < c, full, (full + 1) % 10)
        conf[b], pred[b] = c, p
    d = choose_thresholds(conf, pred, full, max_agreement_drop=0.01)
    assert d.agreement >= 0.99
    assert sum(d.exit_rates.values()) > 0
    loose = choose_thresholds(conf, pred, full, max_agreement_drop=0.10)
    assert sum(loose.exit_rates.values()) >= sum(d.exit_rates.values())


def test_zero_budget_and_never_firing():
    full = np.zeros(10, dtype=int)
    conf = {1: np.full(10, 0.99)}
    pred = {1: np.ones(10, dtype=int)}  # always wrong
    d = choose_thresholds(conf, pred, full, max_agreement_drop=0.0)
    assert d.exit_rates[1] == 0.0 and d.agreement == 1.0


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
