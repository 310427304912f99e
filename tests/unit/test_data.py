import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from splitinfer.data import load_fashion_mnist, load_image_folder, read_idx, to_model_input
from splitinfer.errors import DataError


def _write_idx(path, arr: np.ndarray, dtype_code=0x08):
    header = bytes([0, 0, dtype_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.tobytes())


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_read_idx_refuses_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")
    arr = np.zeros((4, 4), dtype=np.uint8)
    header = bytes([0, 0, 8, 2]) + struct.pack(">2I", 4, 4)
    (tmp_path / "short").write_bytes(header + arr.tobytes()[:-3])
    with pytest.raises(DataError, match="promises"):
        read_idx(tmp_path / "short")


def test_missing_dataset_names_debian_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)


def test_fake_fashion_mnist_dir(tmp_path, monkeypatch):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5, dtype=np.uint8))
    monkeypatch.setenv("SPLITINFER_FASHION_MNIST_DIR", str(tmp_path))
    ds = load_fashion_mnist("test")
    assert len(ds) == 5 and ds.images.shape == (5, 28, 28) and list(ds.labels) == [0, 1, 2, 3, 4]


def test_image_folder(tmp_path):
    for cls, value in (("cats", 10), ("dogs", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 6, 3), value + i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["cats", "dogs"] and list(ds.labels) == [0, 0, 1, 1]
    assert ds.images.shape == (4, 8, 6, 3)
    x = to_model_input(ds.images, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert x.shape == (4, 3, 8, 6)
    small = load_image_folder(tmp_path, size=(4, 4), grayscale=True)
    assert small.images.shape == (4, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read"):
        load_image_folder(tmp_path)
