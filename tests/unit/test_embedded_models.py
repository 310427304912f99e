"""The embedded-model registry, the Fashion-MNIST rendering and its agreement with the agent's upload decoding."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from splitinfer.bundle import InputSpec
from splitinfer.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, render, to_model_input
from splitinfer.imaging import decode_upload
from splitinfer.models import EMBEDDED_MODELS, build_model, embedded_model, example_input
from splitinfer.staged import stage_model


def test_registry_names_both_models_and_refuses_others():
    assert set(EMBEDDED_MODELS) >= {"default", "mobilenet_v2_fmnist"}
    assert embedded_model("mobilenet_v2_fmnist").size == 64
    with pytest.raises(ValueError, match="unknown embedded model 'resnet34'.*mobilenet_v2_fmnist"):
        embedded_model("resnet34")


def test_mobilenet_keeps_torchvision_topology_apart_from_the_stem():
    import torchvision

    ours = build_model("mobilenet_v2_fmnist")
    ref = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    assert ours.features[0][0].in_channels == 1 and ref.features[0][0].in_channels == 3
    names = [(n, type(m).__name__) for n, m in ours.named_modules()]
    assert names == [(n, type(m).__name__) for n, m in ref.named_modules()]
    shapes = {n: p.shape for n, p in ours.named_parameters() if n != "features.0.0.weight"}
    assert shapes == {n: p.shape for n, p in ref.named_parameters() if n != "features.0.0.weight"}


def test_mobilenet_stages_with_exact_head_tail_equality():
    model = build_model("mobilenet_v2_fmnist").eval()
    x = example_input("mobilenet_v2_fmnist", batch=2)
    assert list(x.shape) == [2, 1, 64, 64]
    staged = stage_model(model, x[:1])
    with torch.no_grad():
        full = model(x)
        for k in (8, 17, 27, 38):
            assert torch.equal(staged.run(staged.run(x, 0, k), k, staged.num_stages), full)
    assert [list(staged.boundaries[k].shape) for k in (17, 27, 38, 48)] == [[24, 16, 16], [32, 8, 8], [64, 4, 4],
                                                                             [96, 4, 4]]


def test_render_is_what_the_agent_does_to_an_uploaded_28x28_png():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    spec = InputSpec(shape=[1, 64, 64], mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
                     labels=FASHION_MNIST_CLASSES)
    rendered = to_model_input(render(images, 64), FASHION_MNIST_MEAN, FASHION_MNIST_STD).numpy()
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        np.testing.assert_array_equal(decode_upload(buf.getvalue(), spec)[0], rendered[i])


def test_render_keeps_images_already_at_size():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    assert render(images, 28) is images
