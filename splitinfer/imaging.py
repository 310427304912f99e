"""Decoding uploads (PNG, JPEG, ``.npy``) into the model's normalised input tensor ``[1, C, H, W]``.

Used by the edge agent (HTTP uploads, file sources) and by the cloud server's ``image`` codec (cloud-only
inference from an encoded image, :class:`ImageCodec`), so both sides decode and normalise identically.

Every malformed input raises :class:`~splitinfer.errors.InvalidInput` (or one of the subclasses below, which
the HTTP layer maps to a more precise status) with a message that says what was wrong. Nothing here trusts
the upload: the format is recognised by its magic bytes, image dimensions are checked before any pixel is
decoded (decompression bombs), and ``.npy`` headers are validated before any array is allocated (pickles
and object arrays are refused).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError

from splitinfer.bundle import InputSpec
from splitinfer.data import to_model_input
from splitinfer.errors import InvalidInput

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class UnsupportedMediaType(InvalidInput):
    """The upload is not one of the accepted formats (PNG, JPEG, .npy)."""


class InputTooLarge(InvalidInput):
    """The upload or the image it holds is larger than the configured limits."""


class UnprocessableInput(InvalidInput):
    """A well-formed file whose content does not fit the model (shape, dtype, NaN values)."""


def sniff_format(data: bytes) -> str:
    """``"png"``, ``"jpeg"`` or ``"npy"`` from the magic bytes; UnsupportedMediaType otherwise."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(NPY_MAGIC):
        return "npy"
    raise UnsupportedMediaType("upload is not a PNG, JPEG or .npy file (unrecognised leading bytes)")


def decode_upload(data: bytes, spec: InputSpec,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an uploaded file into a normalised float32 tensor ``[1, *spec.shape]``."""
    if not data:
        raise InvalidInput("the uploaded file is empty")
    kind = sniff_format(data)
    if kind == "npy":
        return decode_npy(data, spec)
    return decode_image(data, spec, max_image_pixels)


def decode_image(data: bytes, spec: InputSpec,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """PNG/JPEG bytes -> ``[1, C, H, W]``: converted to grey (C == 1) or RGB (C == 3), resized, normalised."""
    c, h, w = _spec_chw(spec)
    if c not in (1, 3):
        raise UnprocessableInput(f"images can feed models with 1 or 3 input channels; this model takes {c}")
    try:  # our pixel limit (checked below, before any pixel is decoded) is below Pillow's bomb limits
        im = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError as exc:
        raise InputTooLarge(f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInput("not an image: the PNG/JPEG header cannot be parsed") from None
    except Exception as exc:  # Pillow raises many types on garbage headers
        raise InvalidInput(f"not an image: {exc}") from None
    with im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise InvalidInput(f"image has an empty size {width}x{height}")
        if width * height > max_image_pixels:
            raise InputTooLarge(f"image too large: {width}x{height} pixels, the limit is {max_image_pixels}")
        try:
            if im.format == "JPEG":  # decode at the smallest scale that still covers the target size
                im.draft("L" if c == 1 else "RGB", (w, h))
            im.load()
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.array(im, dtype=np.uint8)
        except Exception as exc:  # truncated or corrupt pixel data
            raise InvalidInput(f"cannot decode the image (truncated or corrupt file): {exc}") from None
    return to_model_input(arr[None], spec.mean, spec.std)


def decode_npy(data: bytes, spec: InputSpec) -> torch.Tensor:
    """``.npy`` bytes -> ``[1, C, H, W]``.

    Accepted shapes: ``[H, W]`` (one-channel models), ``[C, H, W]`` and ``[1, C, H, W]``, matching the plan's
    input exactly. ``uint8`` arrays are pixels (scaled by 1/255, then normalised with the plan's mean/std);
    float arrays are taken as already normalised and must be finite. Pickles and object arrays are refused.
    """
    c, h, w = _spec_chw(spec)
    fh = io.BytesIO(data)
    try:
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
        else:
            raise InvalidInput(f".npy format version {version} is not supported")
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(f"malformed .npy header: {exc}") from None
    if dtype.hasobject or dtype.kind not in "uif" or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidInput(f".npy dtype {dtype} is not accepted (object/pickled arrays are refused; "
                           "use uint8 pixels or float normalised values)")
    if dtype.kind in "ui" and dtype != np.uint8:
        raise UnprocessableInput(f".npy dtype {dtype} is not accepted: use uint8 pixels or float "
                                 "normalised values")
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if numel == 0:
        raise InvalidInput(f".npy array is empty (shape {list(shape)})")
    body = data[fh.tell():]
    expected = numel * dtype.itemsize
    if len(body) < expected:
        raise InvalidInput(f"truncated .npy file: the header promises {expected} bytes of data, "
                           f"found {len(body)}")
    if len(body) > expected:
        raise InvalidInput(f"malformed .npy file: {len(body) - expected} unexpected bytes after the "
                           "array data")
    allowed = [(c, h, w), (1, c, h, w)] + ([(h, w)] if c == 1 else [])
    if shape not in allowed:
        raise UnprocessableInput(f"wrong shape {list(shape)}: this model takes "
                                 f"{' or '.join(str(list(a)) for a in allowed)}")
    arr = np.frombuffer(body, dtype=dtype, count=numel).reshape(shape, order="F" if fortran else "C")
    arr = arr.reshape(1, c, h, w)
    if dtype == np.uint8:
        pixels = np.array(arr[0].transpose(1, 2, 0)[None], order="C", copy=True)  # writable [1, H, W, C]
        return to_model_input(pixels, spec.mean, spec.std)
    x = torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))
    if not torch.isfinite(x).all():
        raise UnprocessableInput(".npy array holds NaN or infinite values")
    return x


def _spec_chw(spec: InputSpec) -> tuple[int, int, int]:
    if len(spec.shape) != 3:
        raise UnprocessableInput(f"the model's input shape {spec.shape} is not [C, H, W]; "
                                 "only images are supported")
    c, h, w = spec.shape
    return int(c), int(h), int(w)


class ImageCodec:
    """Cloud-only inference from a PNG/JPEG file: ``decode`` turns the bytes into ``[1, C, H, W]``.

    Works only at split 0 (the payload is the model input, as a user would upload it). ``encode`` takes the
    pixels ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB) as uint8 and writes PNG (lossless) or JPEG
    (``quality``); meta ``format`` says which. The plan's input spec fixes the size and normalisation;
    decoding applies the same limits as uploads (formats by magic bytes, pixel limit before decoding).
    """

    name = "image"

    def __init__(self, spec: InputSpec, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 fmt: str = "png", quality: int = 90):
        if fmt not in ("png", "jpeg"):
            raise ValueError(f"image codec format must be png or jpeg, got {fmt!r}")
        self.spec = spec
        self.max_image_pixels = max_image_pixels
        self.fmt = fmt
        self.quality = quality

    def encode(self, pixels: np.ndarray | torch.Tensor) -> tuple[bytes, dict[str, str]]:
        """uint8 pixels ``[H, W]`` or ``[H, W, 3]`` -> (PNG/JPEG bytes, ``{"format": ...}``)."""
        arr = np.asarray(pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise InvalidInput(f"image codec encodes uint8 [H, W] or [H, W, 3] pixels, got {arr.dtype} "
                               f"{list(arr.shape)}")
        buf = io.BytesIO()
        im = Image.fromarray(arr)
        if self.fmt == "png":
            im.save(buf, format="PNG", optimize=True)
        else:
            im.save(buf, format="JPEG", quality=self.quality)
        return buf.getvalue(), {"format": self.fmt}

    def decode(self, payload: bytes, meta: dict) -> torch.Tensor:
        """PNG/JPEG bytes -> normalised ``[1, C, H, W]``; the declared format must match the bytes."""
        declared = meta.get("format")
        if declared is not None and declared not in ("png", "jpeg"):
            raise InvalidInput(f"image codec format must be 'png' or 'jpeg', got {declared!r}")
        if not payload:
            raise InvalidInput("empty image payload")
        kind = sniff_format(payload)
        if kind == "npy" or (declared is not None and kind != declared):
            raise InvalidInput(f"image payload is {kind}, not the declared {declared or 'png/jpeg'}")
        return decode_image(payload, self.spec, self.max_image_pixels)
