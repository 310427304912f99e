"""Compression methods on the default architecture (random weights, tiny data): structure, exactness, rules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splitinfer.compression import policy
from splitinfer.compression.deep import DeepConfig, deep_compress, kmeans_1d, magnitude_masks
from splitinfer.compression.layers import finetune, layer_macs, predict, weight_layers
from splitinfer.compression.lowrank import (
    Tucker2Conv,
    apply_structure,
    factorize,
    ranks_for,
    svd_linear,
    total_macs,
    tucker2,
)
from splitinfer.compression.methods import Data, Options, compress
from splitinfer.compression.quantize import attach, bake
from splitinfer.models import build_default
from splitinfer.staged import stage_model

EX = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_default()
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    for b in bns:
        b.momentum = None  # cumulative averages: running statistics that match the data
    m.train()
    with torch.no_grad():
        for _ in range(5):
            m(torch.randn(64, 1, 28, 28))
    for b in bns:
        b.momentum = 0.1
    return m.eval()


@pytest.fixture(scope="module")
def data(model):
    torch.manual_seed(1)
    x = torch.randn(256, 1, 28, 28)
    return Data.of(model, x, None, x[:64])


def test_full_rank_tucker2_and_svd_reproduce_the_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, 2, 1, bias=True)
    lin = nn.Linear(12, 7)
    x, v = torch.randn(2, 16, 9, 9), torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(tucker2(conv, 16, 24)(x), conv(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(svd_linear(lin, 7)(v), lin(v), rtol=1e-4, atol=1e-5)
        low = svd_linear(lin, 3)
        assert low.first.weight.shape == (3, 12) and float((low(v) - lin(v)).norm()) > 0  # truncated: an approximation


def test_factorizing_keeps_boundaries_and_counts_the_three_convolutions(model):
    m = copy.deepcopy(model)
    before = stage_model(model, EX)
    recipe = factorize(m, EX, 0.3)
    after = stage_model(m, EX)
    assert {e["layer"] for e in recipe} >= {"1.0", "2.conv1.0", "4.conv2.0"}
    assert "0.0" not in {e["layer"] for e in recipe}  # a 1-channel stem has nothing low-rank to remove
    assert "5.fc" not in {e["layer"] for e in recipe}  # the classifier holds < 1 % of the MACs
    assert [b.shape for b in after.boundaries] == [b.shape for b in before.boundaries]
    assert after.num_stages == before.num_stages
    assert sum(s.macs for s in after.stage_info) == total_macs(m, EX) <= 0.3 * total_macs(model, EX) + 1
    t2 = m.get_submodule("1.0")
    assert isinstance(t2, Tucker2Conv)
    r_in, r_out = t2.ranks
    assert layer_macs(m, EX)["1.0"] == 28 * 28 * 32 * r_in + 14 * 14 * (r_in * r_out * 9 + r_out * 48)


def test_structure_recipe_rebuilds_the_factorized_model_exactly(model):
    m = copy.deepcopy(model)
    recipe = factorize(m, EX, 0.5)
    fresh = apply_structure(build_default(), recipe)
    fresh.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), m(x))
    with pytest.raises(ValueError, match="does not fit"):
        apply_structure(build_default(), [{"layer": "5.fc", "kind": "tucker2", "ranks": [2, 2]}])
    with pytest.raises(ValueError, match="does not have"):
        apply_structure(build_default(), [{"layer": "9.conv", "kind": "tucker2", "ranks": [2, 2]}])


def test_rank_rule_respects_the_keep_fraction():
    conv = nn.Conv2d(48, 48, 3, padding=1)
    for keep in (0.75, 0.5, 0.25):
        r_in, r_out = ranks_for(conv, 196, 196, keep)
        assert 196 * 48 * r_in + 196 * (r_in * r_out * 9 + r_out * 48) <= keep * 196 * 48 * 48 * 9
        assert r_in % 4 == 0 and r_out % 4 == 0
    assert ranks_for(conv, 196, 196, 1.0) is None
    assert ranks_for(nn.Conv2d(48, 48, 3, groups=48), 196, 196, 0.5) is None


def test_magnitude_masks_and_kmeans():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 2, 1))
    masks = magnitude_masks(m, 0.7, min_weights=1000)
    assert list(masks) == ["0"]  # the second layer (32 weights) is too small to prune
    assert abs(float(masks["0"].mean()) - 0.3) < 0.01
    values = torch.cat([torch.full((50,), -1.0), torch.full((50,), 2.0)]) + 0.01 * torch.randn(100)
    centroids, assign = kmeans_1d(values, 2)
    assert sorted(round(float(c)) for c in centroids) == [-1, 2]
    assert len(set(assign[:50].tolist())) == 1


def test_deep_compression_prunes_shares_and_codes(model, data):
    m = copy.deepcopy(model)
    m, coded, report = deep_compress(m, data.x, data.teacher_logits, None,
                                     DeepConfig(sparsity=0.6, bits=3, prune_epochs=0.5, share_epochs=0.5))
    assert report["sparsity"] > 0.5
    for name, mod in weight_layers(m):
        c = coded[f"{name}.weight"]
        assert torch.equal(mod.weight, c.values())
        assert len(torch.unique(mod.weight)) <= 8  # 7 centroids and the pruned zero
        assert c.codebook[0, 0] == 0


@pytest.mark.parametrize("method", ["ternary", "binary"])
def test_ternary_and_binary_keep_the_ends_in_full_precision(model, method):
    m = copy.deepcopy(model)
    qs = attach(m, method)
    layers = [n for n, _ in weight_layers(m)]
    assert sorted(qs) == sorted(layers[1:-1])
    coded = bake(m, qs)
    for name in qs:
        w = m.get_submodule(name).weight
        per = w.flatten(1)
        if method == "ternary":
            assert len(torch.unique(w)) <= 3 and (w == 0).any()
        else:
            assert all(len(torch.unique(row.abs())) == 1 for row in per)  # +-alpha per output channel
        assert torch.equal(w, coded[f"{name}.weight"].values())


def test_uniform_bits_have_the_stated_levels(model):
    m = copy.deepcopy(model)
    qs = attach(m, "uniform", bits={"2.conv1.0": 2, "4.conv1.0": 4}, pow2=True)
    coded = bake(m, qs)
    w2 = m.get_submodule("2.conv1.0").weight
    assert all(len(torch.unique(row)) <= 3 for row in w2.flatten(1))  # 2 bits: -s, 0, +s
    scales = coded["4.conv1.0.weight"].scales
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # dynamic fixed point: powers of two


def test_policy_search_takes_the_least_summed_distortion_within_the_budget():
    sens = policy.Sensitivity(settings=(1.0, 0.5, 0.25), base_cost=10.0)
    sens.distortion = {"a": [0.0, 0.01, 0.5], "b": [0.0, 0.2, 0.3]}
    sens.cost = {"a": [100.0, 50.0, 25.0], "b": [100.0, 50.0, 25.0]}
    choice, cost, predicted = policy.knapsack(sens, 160.0)
    assert choice == {"a": 1, "b": 0} and cost == 160.0 and predicted == pytest.approx(0.01)
    choice, cost, _ = policy.knapsack(sens, 90.0)
    assert choice == {"a": 1, "b": 2} and cost == 85.0  # 0.31 beats a at 25 + b at 50 (0.7) and both at 25 (0.8)
    with pytest.raises(ValueError, match="below the cheapest"):
        policy.knapsack(sens, 40.0)
    tied = policy.Sensitivity(settings=(1.0, 0.7, 0.6, 0.5), base_cost=0.0)
    tied.distortion, tied.cost = {"a": [0.0, 0.1, 0.1, 0.2]}, {"a": [100.0, 60.0, 60.0, 40.0]}
    assert policy.knapsack(tied, 50.0)[0] == {"a": 3}
    assert policy.knapsack(tied, 60.0)[0] == {"a": 1}  # the same cost and distortion: the setting listed first


def test_policy_search_is_exact_where_a_greedy_pass_is_not():
    # one step at a time by distortion per cost saved, a greedy pass takes b's cheap first step, then must push
    # a to its last setting and b to its second: 0.9; the optimum keeps b whole and sends a to its last: 0.6
    sens = policy.Sensitivity(settings=(1.0, 0.5, 0.1), base_cost=0.0)
    sens.distortion = {"a": [0.0, 0.5, 0.6], "b": [0.0, 0.1, 0.3]}
    sens.cost = {"a": [100.0, 90.0, 10.0], "b": [100.0, 50.0, 40.0]}
    choice, cost, predicted = policy.knapsack(sens, 110.0)
    assert choice == {"a": 2, "b": 0} and cost == 110.0 and predicted == pytest.approx(0.6)
    # against every combination
    import itertools
    for budget in (50.0, 60.0, 95.0, 140.0, 150.0, 200.0):
        feasible = [(sens.distortion["a"][i] + sens.distortion["b"][j], (i, j))
                    for i, j in itertools.product(range(3), range(3))
                    if sens.cost["a"][i] + sens.cost["b"][j] <= budget]
        choice, cost, predicted = policy.knapsack(sens, budget)
        assert cost <= budget and predicted == pytest.approx(min(feasible)[0])


def test_auto_policy_meets_its_mac_budget(model, data):
    result = compress(model, EX, "auto", data, Options(epochs=0.25, budget=0.5))
    assert result.report["macs_after"] <= 0.5 * result.report["macs_before"]
    assert set(result.report["keep"]) >= {"1.0", "4.conv2.0"}
    assert result.structure and all(e["kind"] == "tucker2" for e in result.structure)


def test_finetune_moves_the_student_toward_the_teacher(model, data):
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from splitinfer.compression.layers import kl_to

    before = kl_to(predict(student, data.x), data.teacher_logits)
    finetune(student, data.x, data.teacher_logits, epochs=3, lr=3e-3)
    assert kl_to(predict(student, data.x), data.teacher_logits) < before
