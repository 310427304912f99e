"""Datasets: Fashion-MNIST from Debian's gzipped IDX files, and an image folder for users' own data."""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitinfer.errors import DataError

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "SPLITINFER_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Normalisation used by the embedded default model (mean/std of the Fashion-MNIST training images).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a numpy array, checking its header and length."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX body has {len(data) - header} bytes, header promises {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(root: str | Path | None = None) -> Path:
    """Resolve the Fashion-MNIST directory: explicit argument, then $SPLITINFER_FASHION_MNIST_DIR, then Debian's."""
    return Path(root or os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR)


@dataclass
class ImageDataset:
    """Images as uint8 ``[N, H, W]`` (grey) or ``[N, H, W, C]`` and integer labels, with class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageDataset:
    """Load the ``train`` (60,000) or ``test`` (10,000) split of Fashion-MNIST as uint8 images.

    Fails with a message naming the Debian package when the files are missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = fashion_mnist_dir(root)
    prefix = "train" if split == "train" else "t10k"
    img_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found: missing {', '.join(str(p) for p in missing)}. "
            f"Install it with `apt-get install dataset-fashion-mnist` (Debian package), or point "
            f"--data-dir / ${FASHION_MNIST_ENV} at a folder holding the gzipped IDX files."
        )
    images = read_idx(img_path)
    labels = read_idx(lbl_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}")
    return ImageDataset(images=images, labels=labels, classes=list(FASHION_MNIST_CLASSES))


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_folder(root: str | Path, size: tuple[int, int] | None = None, grayscale: bool = False) -> ImageDataset:
    """Load ``root/<class>/<image>`` files (class = sub-folder name, sorted) as a uint8 dataset.

    Images are resized to ``size`` (H, W) when given; otherwise all must share one size.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders")
    images, labels = [], []
    for idx, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if grayscale else "RGB")
                    if size is not None:
                        im = im.resize((size[1], size[0]))
                    images.append(np.asarray(im, dtype=np.uint8))
            except OSError as exc:
                raise DataError(f"cannot read image {f}: {exc}") from exc
            labels.append(idx)
    if not images:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"images in {root} have different sizes {sorted(shapes)}; pass size=(H, W)")
    return ImageDataset(images=np.stack(images), labels=np.asarray(labels, dtype=np.int64), classes=classes)


def render(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 grey images ``[N, H, W]`` resized to ``size`` (a side, or ``(height, width)``) the way the edge
    agent resizes an upload (Pillow, bilinear), so a model trained on rendered images sees the same pixels when
    it is served; unchanged when they already have that size."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if images.shape[1:] == (h, w):
        return images
    out = np.empty((len(images), h, w), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.BILINEAR))
    return out


def to_model_input(images: np.ndarray, mean: float | list[float], std: float | list[float]) -> torch.Tensor:
    """uint8 images ``[N,H,W]`` or ``[N,H,W,C]`` -> normalised float32 tensor ``[N,C,H,W]``
    (:func:`splitinfer.imaging.normalise`, as a tensor)."""
    from splitinfer.imaging import normalise

    return torch.from_numpy(normalise(images, mean, std))


def save_test_images(out: str | Path, count: int, fmt: str = "png", root: str | Path | None = None,
                     start: int = 0) -> list[Path]:
    """Write Fashion-MNIST test images ``start .. start + count - 1`` as PNG or JPEG files named
    ``INDEX_CLASS.png`` (e.g. ``0_ankle-boot.png``) into ``out``, to try the agent with; returns the paths."""
    from PIL import Image

    if fmt not in ("png", "jpeg"):
        raise ValueError(f"format must be png or jpeg, got {fmt!r}")
    test = load_fashion_mnist("test", root)
    if not 0 <= start < len(test) or not 1 <= count <= len(test) - start:
        raise ValueError(f"the test set holds {len(test)} images: start {start} and count {count} do not fit")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        slug = FASHION_MNIST_CLASSES[int(test.labels[i])].lower().replace("/", "-").replace(" ", "-")
        path = folder / f"{i}_{slug}.{'png' if fmt == 'png' else 'jpg'}"
        Image.fromarray(test.images[i]).save(path, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
        paths.append(path)
    return paths
