"""`plan codec-sweep` on the committed default model (tiny: the figures are measured by the real sweep)."""

import pytest

from partitioner.sweep import run_sweep
from splitinfer.data import fashion_mnist_dir

pytestmark = [
    pytest.mark.slow,  # trains bottlenecks (about 27 s)
    pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                       reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"),
]


def test_sweep_lists_ptq_and_qat_points_with_references():
    result = run_sweep([6], [4], [2, 3], epochs_float=1, epochs_qat=1, train_limit=256, test_limit=100, threads=2,
                       echo=lambda _: None)
    assert [(p["channels"], p["bits"]) for p in result["points"]] == [(4, 2), (4, 3)]
    two, three = result["points"]
    for p in result["points"]:
        assert {"ptq", "qat"} <= set(p) and p["fp32_bytes"] == 37632
        assert 9 < p["ptq"]["bytes_mean"] < 4 * 7 * 7  # header + at most 8 bits per latent value
    assert two["ptq"]["bytes_mean"] < three["ptq"]["bytes_mean"]  # fewer bits, fewer bytes
    ref = result["references"][0]
    assert ref["codec"] == "uint8-affine" and ref["bytes_mean"] == 9792
    with pytest.raises(ValueError, match="interior"):
        run_sweep([0], [4], [2])
