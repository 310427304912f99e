"""Token tensors ([L, D], a transformer between blocks): exit heads, the learned bottleneck, the zoo registry."""

from __future__ import annotations

import pytest
import torch

from splitinfer.bottleneck import Bottleneck, LearnedCodec, bottleneck_boundaries, check_boundaries
from splitinfer.exits import ExitHead
from splitinfer.macs import counting_macs
from splitinfer.plan import BottleneckConfig
from splitinfer.staged import stage_model


def _count(module, x) -> int:
    with torch.no_grad(), counting_macs() as c:
        module(x)
    return c.macs


def test_token_exit_head_reads_class_and_mean_token_and_counts_its_macs():
    head = ExitHead([50, 96], 10).eval()
    x = torch.randn(3, 50, 96)
    assert head(x).shape == (3, 10)
    assert head.macs() == _count(head, x[:1])
    y = x.clone()
    y[:, 1:] = y[:, 1:].flip(1)  # token order does not matter beyond the first (class) token
    assert torch.allclose(head(x), head(y), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[L, D\]"):
        ExitHead([96], 10)


@pytest.mark.parametrize("stride", [1, 2])
def test_token_bottleneck_shapes_macs_and_codec_round_trip(stride):
    cfg = BottleneckConfig.for_boundary(9, [50, 96], stride=stride)
    assert cfg.tokens and cfg.map_shape == (96, 50, 1)
    assert cfg.latent_shape == [cfg.channels, 50 // stride, 1]  # stride 2 merges pairs of tokens
    assert BottleneckConfig.from_params(cfg.to_params()) == cfg
    bn = Bottleneck(cfg, nonneg=False).eval()
    x = torch.randn(64, 50, 96)
    with torch.no_grad():
        bn.calibrate(x)
        assert bn(x[:2]).shape == (2, 50, 96)
    enc, dec = bn.macs()
    assert enc == _count(bn.encoder, x[:1])
    with torch.no_grad():
        z = bn.encoder(x[:1])
    assert dec == _count(bn.decoder, z)
    codec = LearnedCodec(bn)
    payload, meta = codec.encode(x[:1])
    assert len(payload) < 50 * 96 // 16  # a few bits per token
    out = codec.decode(payload, meta)
    assert out.shape == (1, 50, 96)
    with torch.no_grad():
        expected = bn.decoder(bn.quantizer.from_symbols(bn.quantizer.to_symbols(bn.encoder(x[:1]))))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_token_sizes_follow_the_rule():
    cfg = BottleneckConfig.for_boundary(3, [197, 768])
    assert (cfg.stride, cfg.hidden, cfg.channels) == (1, 64, 32)
    with pytest.raises(ValueError, match=r"\[L, D\]"):
        BottleneckConfig.for_boundary(3, [768])


def test_transformer_boundaries_take_bottlenecks():
    from splitinfer.models import build_model

    model = build_model("vit_fmnist")
    staged = stage_model(model, torch.zeros(1, 1, 28, 28))
    valid = bottleneck_boundaries(staged)
    tokens = [b.index for b in staged.boundaries if b.shape == [50, 96]]
    assert set(tokens) <= set(valid)
    check_boundaries(staged, tokens[:2])
    with pytest.raises(ValueError, match="not an interior"):
        check_boundaries(staged, [staged.num_stages])


def test_zoo_names_sizes_and_suggestions():
    pytest.importorskip("torchvision")
    from splitinfer.models import build_model, torchvision_model, unknown_model_message

    assert torchvision_model("vit_h_14").input_shape == (3, 518, 518)  # its default weights' size
    assert torchvision_model("inception_v3").input_shape == (3, 299, 299)
    assert len(torchvision_model("resnet34").categories) == 1000
    msg = unknown_model_message("resnet43", ("default",))
    assert "did you mean 'resnet34'" in msg and "plan models" in msg
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    assert build_model("resnet18", 10).fc.out_features == 10


def test_vit_fmnist_exits_sit_on_token_boundaries():
    from splitinfer.models import EMBEDDED_MODELS, build_model

    staged = stage_model(build_model("vit_fmnist").eval(), torch.zeros(1, 1, 28, 28))
    for b in EMBEDDED_MODELS["vit_fmnist"].exits:
        assert staged.boundaries[b].shape == [50, 96], b


def test_token_bottleneck_trains_with_the_adversarial_defence():
    """Distillation (and the inversion adversary of the privacy defence) on a token boundary: [C, L, 1] latents
    are decoded by the adversary through a dense entry, not an image convolution."""
    import numpy as np

    from splitinfer.bottleneck import DistillConfig, train_bottleneck
    from splitinfer.models import build_model

    torch.manual_seed(0)
    staged = stage_model(build_model("vit_fmnist").eval(), torch.zeros(1, 1, 28, 28))
    cfg = BottleneckConfig.for_boundary(9, staged.boundaries[9].shape, bits=2, channels=4)
    x = torch.randn(32, 1, 28, 28)
    bn, report = train_bottleneck(staged, cfg, x, DistillConfig(epochs_float=1, epochs_qat=1, batch_size=16,
                                                                privacy="adversarial", privacy_weight=0.5),
                                  progress=False)
    assert all(np.isfinite(h["adversary_loss"]) for h in report["history"])
    payload, meta = LearnedCodec(bn).encode(staged.run(x[:1], 0, 9))
    assert LearnedCodec(bn).decode(payload, meta).shape == (1, 50, 96)


def test_train_config_for_an_embedded_model_is_its_committed_recipe():
    from partitioner.train import TrainConfig

    vit = TrainConfig.for_model("vit_fmnist")
    assert (vit.optimizer, vit.lr, vit.weight_decay, vit.epochs) == ("adamw", 2e-3, 0.05, 10)
    assert TrainConfig.for_model("vit_fmnist", epochs=1, train_limit=None).epochs == 1
    assert TrainConfig.for_model("default").optimizer == "sgd"
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.for_model("nope")

