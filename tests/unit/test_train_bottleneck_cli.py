"""`splitinfer plan train-bottleneck` for any model at several boundaries: files written and read back, the random
teacher said plainly, and refusals (bad boundary, pickled checkpoint, missing --out-dir) without a traceback."""

from __future__ import annotations

import json
import pickle

import pytest
from typer.testing import CliRunner

from partitioner.cli import app
from partitioner.codec import load_bottlenecks, load_default_bottleneck
from splitinfer.data import fashion_mnist_dir
from splitinfer.errors import BundleError

needs_fashion_mnist = pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                         reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
QUICK = ["--epochs-float", "1", "--epochs-qat", "1", "--train-limit", "128", "--test-limit", "32", "--threads", "2",
         "--no-progress"]


def _run(*args: str):
    return CliRunner().invoke(app, ["train-bottleneck", *args])


def _refused(result, *words: str) -> None:
    """Exit 2 with an error naming ``words``, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for w in words:
        assert w in result.output, result.output


@pytest.mark.slow
@needs_fashion_mnist
def test_random_torchvision_model_at_two_boundaries_writes_loads_and_says_random_teacher(tmp_path):
    out = tmp_path / "bn"
    result = _run("--model", "resnet18", "--input-shape", "3,32,32", "--boundary", "5,9", "--out-dir", str(out),
                  *QUICK)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("bottleneck at boundary")]
    assert len(lines) == 2 and all("agreement with a random teacher" in line for line in lines)
    assert "accuracy 0." not in result.output  # no accuracy figure for a random teacher
    names = sorted(p.name for p in out.iterdir())
    assert names == ["resnet18_bottleneck_5.json", "resnet18_bottleneck_5.safetensors",
                     "resnet18_bottleneck_9.json", "resnet18_bottleneck_9.safetensors"]
    found = load_bottlenecks(out, "resnet18")
    assert sorted(found) == [5, 9]
    bn5, info5 = found[5]
    assert list(bn5.cfg.in_shape) == [64, 8, 8] and bn5.cfg.stride == 2  # sized by the rule
    assert info5["teacher_weights"] == "random" and info5["model"] == "resnet18"
    assert "random teacher" in info5["note"] and "accuracy" not in info5["test"]
    assert info5["input_shape"] == [3, 32, 32] and info5["seed"] == 0
    assert info5["command"].startswith("splitinfer plan train-bottleneck --model resnet18 --input-shape 3,32,32 "
                                       "--boundary 5,9")
    assert "--boundary 5 --channels" in info5["reproduce"]

    # the loader checks the hash, the format and the shape at the boundary
    from partitioner.target import load_target

    with pytest.raises(BundleError, match="is \\[64, 16, 16\\]"):
        load_bottlenecks(out, "resnet18", staged=load_target("resnet18", input_shape=[3, 64, 64]).staged)
    with pytest.raises(BundleError, match="holds a bottleneck of model 'resnet18'"):
        info = json.loads((out / "resnet18_bottleneck_9.json").read_text())
        (out / "resnet34_bottleneck_9.json").write_text(json.dumps(info))
        load_bottlenecks(out, "resnet34")
    weights = out / "resnet18_bottleneck_9.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_bottlenecks(out, "resnet18")
    weights.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bottlenecks(out, "resnet18")


@pytest.mark.slow
@needs_fashion_mnist
def test_the_committed_default_codec_flag_line_still_works(tmp_path):
    """The committed codec's command (its JSON), shortened: it writes default_bottleneck_6.* with accuracy."""
    committed = load_default_bottleneck()[1]
    args = committed["command"].split()[3:]  # after "splitinfer plan train-bottleneck"
    for flag in ("--epochs-float", "--epochs-qat"):
        args[args.index(flag) + 1] = "0"  # calibration only: the flags parse and the files are the same kind
    result = _run(*args, "--train-limit", "256", "--test-limit", "64", "--out-dir", str(tmp_path), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "random teacher" not in result.output
    bn, info = load_default_bottleneck(tmp_path)
    assert info["config"] == committed["config"]  # boundary 6, 8 channels, 2 bits, hidden 48, stride 2, ans
    assert info["teacher_weights"] == "committed" and info["model"] == "default"
    assert (tmp_path / "default_bottleneck_6.safetensors").is_file()


def test_bad_boundary_is_refused_with_the_valid_ones(tmp_path):
    result = _run("--model", "resnet18", "--input-shape", "3,32,32", "--boundary", "5,99", "--out-dir",
                  str(tmp_path))
    _refused(result, "boundary 99 is not an interior [C, H, W] or [L, D] boundary of resnet18", "choose from 1-21")
    _refused(_run("--model", "resnet18", "--input-shape", "3,32,32", "--boundary", "22", "--out-dir",
                  str(tmp_path)), "boundary 22")  # a [512] vector
    _refused(_run("--model", "resnet18", "--input-shape", "3,32,32", "--out-dir", str(tmp_path)),
             "no boundary given")
    _refused(_run("--boundary", "0", "--out-dir", str(tmp_path)), "boundary 0 is not")
    _refused(_run("--boundary", "six"), "comma-separated integers")
    _refused(_run("--stride", "3"), "must be one of 1, 2, 4")
    assert not list(tmp_path.iterdir())


def test_pickled_checkpoint_missing_out_dir_and_misplaced_options_are_refused(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(pickle.dumps({"conv1.weight": [0.0]}))
    _refused(_run("--model", "resnet18", "--checkpoint", str(ckpt), "--input-shape", "3,32,32", "--boundary", "5",
                  "--out-dir", str(tmp_path / "out")), "not a safetensors file")
    _refused(_run("--model", "resnet18", "--input-shape", "3,32,32", "--boundary", "5"), "--out-dir is required")
    _refused(_run("--model", "default", "--checkpoint", str(ckpt)), "embedded model")
    _refused(_run("--model", "nope"), "unknown model 'nope'")
    assert not (tmp_path / "out").exists()


def test_image_folder_trains_the_default_model_and_scores_named_classes(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("Bag", "Coat", "Sneaker"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    out = tmp_path / "out"
    result = _run("--images", str(tmp_path / "img"), "--boundary", "8", "--epochs-float", "0", "--epochs-qat", "0",
                  "--out-dir", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output  # the folder's classes are Fashion-MNIST's: labels are used
    (bn, info), = load_bottlenecks(out, "default").values()
    assert bn.cfg.boundary == 8 and info["test_images"] == 2 and info["train_images"] == 10
    assert info["data"].startswith("image folder") and "--images" in info["command"]
