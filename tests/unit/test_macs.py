"""MACs counted at the ATen level: each kind of product against its formula, and through the staged model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitinfer.macs import counting_macs
from splitinfer.staged import stage_model


def _count(fn) -> int:
    with torch.no_grad(), counting_macs() as c:
        fn()
    return c.macs


def test_convolutions_grouped_and_transposed():
    x = torch.randn(2, 8, 10, 10)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    assert _count(lambda: conv(x)) == 2 * 16 * 10 * 10 * 8 * 9
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    assert _count(lambda: grouped(x)) == 2 * 16 * 10 * 10 * 2 * 9
    up = nn.ConvTranspose2d(8, 4, 2, stride=2)  # every input value meets 4 x 2 x 2 weights
    assert _count(lambda: up(x)) == 2 * 8 * 10 * 10 * 4 * 4


def test_linear_matmul_einsum_and_vectors():
    lin = nn.Linear(6, 5)
    assert _count(lambda: lin(torch.randn(3, 6))) == 3 * 6 * 5
    assert _count(lambda: lin(torch.randn(2, 7, 6))) == 2 * 7 * 6 * 5  # token tensors through a Linear
    a, b = torch.randn(4, 3, 5), torch.randn(4, 5, 2)
    assert _count(lambda: a @ b) == 4 * 3 * 5 * 2
    assert _count(lambda: torch.einsum("bij,bjk->bik", a, b)) == 4 * 3 * 5 * 2
    assert _count(lambda: torch.randn(3, 4) @ torch.randn(4)) == 12
    assert _count(lambda: torch.relu(a) + a * 2) == 0  # element-wise arithmetic is no MAC


def test_attention_products_are_counted_in_every_form():
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 4)
    assert _count(lambda: nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * 3 * 7 * 9 * (8 + 4)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    # in-projection (3 x 16 x 16 per token), q k^T and attention x v (5 x 5 x 16 each), out-projection
    expected = 2 * (5 * 16 * 48 + 2 * 5 * 5 * 16 + 5 * 16 * 16)
    assert _count(lambda: mha(x, x, x, need_weights=False)) == expected
    # the fused inference fast path is off only while counting
    assert torch.backends.mha.get_fastpath_enabled()


class _Block(nn.Module):
    """A transformer block: the MHA leaf returns a tuple (no tensor is live alone inside it)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        y = self.norm(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(x)


def test_staged_transformer_counts_per_sample_and_cuts_between_blocks():
    model = nn.Sequential(_Block(), _Block()).eval()
    staged = stage_model(model, torch.randn(3, 5, 16))  # MACs are per sample whatever the example batch
    per_block = 5 * 16 * 48 + 2 * 5 * 5 * 16 + 5 * 16 * 16 + 5 * 16 * 16
    assert staged.macs_between(0, staged.num_stages) == 2 * per_block
    assert [5, 16] in [b.shape for b in staged.boundaries[1:-1]]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        for k in range(staged.num_stages + 1):
            assert torch.equal(staged.run(staged.run(x, 0, k), k, staged.num_stages), model(x))


def test_fastpath_switch_is_restored_once_by_the_last_overlapping_count():
    from splitinfer.macs import mha_fastpath_disabled

    before = torch.backends.mha.get_fastpath_enabled()
    first = counting_macs()
    first.__enter__()
    with mha_fastpath_disabled():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert not torch.backends.mha.get_fastpath_enabled()  # the first block is still counting
    first.__exit__(None, None, None)
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_a_vit_head_exports_to_onnx_and_matches_torch():
    """The fused attention fast path is switched off while exporting, so a transformer head is plain ONNX."""
    pytest.importorskip("onnxruntime")
    from splitinfer.models import build_model
    from splitinfer.onnx_util import check_against, export_onnx
    from splitinfer.staged import stage_model

    staged = stage_model(build_model("vit_fmnist").eval(), torch.zeros(1, 1, 28, 28))
    head = staged.head(9)
    x = torch.randn(3, 1, 28, 28)
    modes = [m.training for m in staged.modules()]
    data = export_onnx(head, x[:1])
    assert [m.training for m in staged.modules()] == modes  # exporting left every module in its mode (BN in eval)
    check_against("vit head", data, head, x)  # batch 3 through a batch-1 trace
