"""Decoding uploads (PNG, JPEG, ``.npy``) into the model's normalised input ``[1, C, H, W]`` (float32 numpy).

Torch-free (the edge agent runs without torch on an ONNX head); :meth:`ImageCodec.decode`, the server's
codec, hands the tail a torch tensor.

Used by the edge agent (HTTP uploads, file sources) and by the cloud server's ``image`` codec (cloud-only
inference from an encoded image, :class:`ImageCodec`), so both sides decode and normalise identically.

Every malformed input raises :class:`~splitinfer.errors.InvalidInput` (or one of the subclasses below, which
the HTTP layer maps to a more precise status) with a message that says what was wrong. Nothing here trusts
the upload: the format is recognised by its magic bytes, and ``.npy`` headers are validated before any array
is allocated (pickles and object arrays are refused).

Images and memory (decompression bombs). ``max_image_pixels`` bounds the pixels the decoder holds in memory,
not the pixels the header announces, and it is checked from the headers, before any pixel is decoded:

* a sequential (baseline) JPEG is decoded at reduced size, the smallest libjpeg scale (1/1, 1/2, 1/4, 1/8)
  that still covers the model's input (Pillow's draft mode), so a 4032x3024 phone photo for a 224x224 model
  costs a 504x378 decode; the limit applies to that reduced size;
* a progressive or multi-scan JPEG keeps the DCT coefficients of the whole image while it decodes (2 bytes
  a sample), and a lossless/hierarchical one cannot be scaled: the limit applies to the full size;
* a PNG has no reduced decode: the limit applies to its full size.

Each decoded pixel takes about 4 bytes (Pillow stores RGB as 32 bits), up to about 8 while a colour
conversion copies the image, so one decode holds about ``4 x max_image_pixels`` bytes and at most twice that.
Refusals (:class:`InputTooLarge`) name the setting; Pillow's own bomb guard never fires first, since the
files are opened with the PNG/JPEG plugin classes, which leave the size check to us (see ``decode_image``).
EXIF orientation (phone photos) is applied after the resize, where it costs a transpose of the small image.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, JpegImagePlugin, PngImagePlugin

from splitinfer.errors import InvalidInput
from splitinfer.plan import InputSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
EDGE_PIXELS_SETTING = "max_image_pixels (env SPLITINFER_EDGE_MAX_IMAGE_PIXELS)"
CODEC_PIXELS_SETTING = "the image codec's max_image_pixels"

_JPEG_MIN_SCALE = 8  # libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 of the full size; Pillow's draft picks one
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_SEQUENTIAL_SOF = frozenset({0xC0, 0xC1, 0xC9})  # sequential DCT: decodable at reduced size
_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {  # EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                         Image.Transpose.ROTATE_270})


def normalise(images: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
    """uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` -> normalised float32 ``[N, C, H, W]`` (contiguous):
    ``(pixels / 255 - mean) / std`` per channel, in float32. The one normalisation: training data, uploads
    and the torch-free agent (:func:`splitinfer.data.to_model_input` wraps it)."""
    x = np.ascontiguousarray(images).astype(np.float32) / np.float32(255.0)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def denormalise(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A normalised input ``[1, C, H, W]`` back to uint8 pixels: ``[H, W]`` (grey) or ``[H, W, C]``."""
    c = int(spec.shape[0])
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    pixels = np.clip(np.rint((np.asarray(x[0], dtype=np.float32) * std + mean) * np.float32(255.0)), 0, 255)
    pixels = pixels.astype(np.uint8)
    return pixels[0] if c == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))


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


def decode_upload(data: bytes, spec: InputSpec, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *,
                  setting: str = EDGE_PIXELS_SETTING) -> np.ndarray:
    """Decode an uploaded file into a normalised float32 tensor ``[1, *spec.shape]``.

    ``setting`` is how a refusal names the pixel limit (the edge agent's setting by default)."""
    if not data:
        raise InvalidInput("the uploaded file is empty")
    kind = sniff_format(data)
    if kind == "npy":
        return decode_npy(data, spec)
    return decode_image(data, spec, max_image_pixels, setting=setting)


def decode_image(data: bytes, spec: InputSpec, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *,
                 setting: str = EDGE_PIXELS_SETTING) -> np.ndarray:
    """PNG/JPEG bytes -> ``[1, C, H, W]``: converted to grey (C == 1) or RGB (C == 3), resized, turned upright
    (EXIF orientation), normalised.

    At most ``max_image_pixels`` pixels are decoded (see the module docstring): a sequential JPEG is decoded
    at the smallest scale that covers the model's input, and an image still above the limit is refused with
    :class:`InputTooLarge`, before any pixel is decoded, by a message that names ``setting``.
    """
    c, h, w = _spec_chw(spec)
    if c not in (1, 3):
        raise UnprocessableInput(f"images can feed models with 1 or 3 input channels; this model takes {c}")
    mode = "L" if c == 1 else "RGB"
    if data.startswith(JPEG_MAGIC):
        plugin, (width, height, full_size) = JpegImagePlugin.JpegImageFile, _jpeg_frame(data)
    elif data.startswith(PNG_MAGIC):
        plugin, (width, height), full_size = PngImagePlugin.PngImageFile, _png_size(data), "PNG, decoded at full size"
    else:
        raise InvalidInput("not an image: the PNG/JPEG header cannot be parsed")
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has an empty size {width}x{height}")

    def too_large(decoded: str) -> InputTooLarge:
        return InputTooLarge(f"image too large: {width}x{height} pixels {decoded}, more than the limit of "
                             f"{max_image_pixels} decoded pixels set by {setting}")

    if full_size is not None and width * height > max_image_pixels:
        raise too_large(f"({full_size})")
    least = (-(-width // _JPEG_MIN_SCALE), -(-height // _JPEG_MIN_SCALE))
    if full_size is None and least[0] * least[1] > max_image_pixels:  # absurd header, refused without Pillow
        raise too_large(f"(JPEG, {least[0]}x{least[1]} decoded even at the smallest scale, 1/8)")
    # Image.open would run Pillow's decompression-bomb check on the header size (an error above about 179 M
    # pixels, in Pillow's wording) before a JPEG can be drafted to a reduced size. The plugin classes are what
    # Image.open instantiates, without that check: the limit here is max_image_pixels on the decoded size,
    # checked from the headers above and after draft() below. Pillow's guard stays on for every other use of
    # Pillow in the process: Image.MAX_IMAGE_PIXELS is process-wide (and changing it is not thread-safe).
    try:
        im = plugin(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types on garbage headers
        raise InvalidInput(f"not an image: the {plugin.format} header cannot be parsed ({exc})") from None
    with im:
        if im.size != (width, height):
            raise InvalidInput(f"malformed {plugin.format} header: sizes {width}x{height} and "
                               f"{im.size[0]}x{im.size[1]}")
        upright = None
        if im.format == "JPEG":  # decode at the smallest scale that still covers the target size
            upright = _upright(im)
            im.draft(mode, (h, w) if upright in _SWAPS_AXES else (w, h))
            if full_size is None and im.size[0] * im.size[1] > max_image_pixels:
                raise too_large(f"(JPEG, {im.size[0]}x{im.size[1]} decoded for this model's {w}x{h} input)")
        try:
            im.load()
            if im.format == "PNG":  # an eXIf chunk may follow the pixels
                upright = _upright(im)
            out = im if im.mode == mode else im.convert(mode)
            size = (h, w) if upright in _SWAPS_AXES else (w, h)
            if out.size != size:
                out = out.resize(size, Image.Resampling.BILINEAR)
            if upright is not None:  # on the small image: cheaper than ImageOps.exif_transpose before resizing
                out = out.transpose(upright)
            arr = np.array(out, dtype=np.uint8)
        except Image.DecompressionBombError:  # not raised on this path; Pillow's wording must never show
            raise too_large("(refused by the imaging library)") from None
        except Exception as exc:  # truncated or corrupt pixel data
            raise InvalidInput(f"cannot decode the image (truncated or corrupt file): {exc}") from None
    return normalise(arr[None], spec.mean, spec.std)


def _upright(im: Image.Image) -> Image.Transpose | None:
    """The transpose that shows ``im`` upright according to its EXIF orientation (None: already upright,
    no orientation or an unreadable one: a bad EXIF block is no reason to refuse the picture)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION)
    except Exception:
        return None
    return _UPRIGHT.get(value) if isinstance(value, int) else None


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which must come first."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise InvalidInput("not an image: the PNG header cannot be parsed (no IHDR chunk)")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


_JPEG_FILL = re.compile(rb"\xff+")


def _jpeg_frame(data: bytes) -> tuple[int, int, str | None]:
    """Width, height and, when the decoder holds the whole image in memory, why (else None): reads the
    markers up to the first scan, as libjpeg does.

    libjpeg decodes a sequential JPEG whose first scan holds every component row by row, at any scale; a
    progressive or multi-scan one keeps every DCT coefficient of the full image until the last scan; lossless
    and hierarchical ones do not scale.
    """
    n, i, frame = len(data), 2, None
    while True:
        j = data.find(b"\xff", i)  # junk between segments (Pillow and libjpeg skip it too)
        i = n if j < 0 else _JPEG_FILL.match(data, j).end()  # then any fill bytes (0xFF runs)
        if i >= n:
            raise InvalidInput("truncated JPEG: the file ends before the image data")
        marker = data[i]
        i += 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker == 0xD9:
            raise InvalidInput("malformed JPEG: end-of-image marker before any image data")
        length = int.from_bytes(data[i:i + 2], "big")
        body = data[i + 2:i + length]
        if i + 2 > n or len(body) < length - 2:
            raise InvalidInput("truncated JPEG: the file ends inside a header segment")
        if length < 2:
            raise InvalidInput(f"malformed JPEG: segment length {length} (marker 0xFF{marker:02X})")
        i += length
        if marker in _JPEG_SOF:
            if frame is not None:
                raise InvalidInput("malformed JPEG: two frame headers (SOF markers)")
            if len(body) < 6:
                raise InvalidInput("malformed JPEG: frame header (SOF) too short")
            frame = (marker, int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"), body[5])
        elif marker == 0xDA:
            if frame is None:
                raise InvalidInput("malformed JPEG: image data before the frame header (no SOF marker)")
            sof, width, height, components = frame
            if sof in _JPEG_PROGRESSIVE_SOF:
                return width, height, "progressive JPEG, held at full size while it decodes"
            if sof not in _JPEG_SEQUENTIAL_SOF:
                return width, height, "lossless or hierarchical JPEG, decoded at full size"
            if not body or body[0] < components:
                return width, height, "multi-scan JPEG, held at full size while it decodes"
            return width, height, None


def decode_npy(data: bytes, spec: InputSpec) -> np.ndarray:
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
        return normalise(pixels, spec.mean, spec.std)
    x = np.array(arr, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(x).all():
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
                 fmt: str = "png", quality: int = 90, setting: str = CODEC_PIXELS_SETTING):
        if fmt not in ("png", "jpeg"):
            raise ValueError(f"image codec format must be png or jpeg, got {fmt!r}")
        self.spec = spec
        self.max_image_pixels = max_image_pixels
        self.setting = setting
        self.fmt = fmt
        self.quality = quality

    def encode(self, pixels: np.ndarray) -> tuple[bytes, dict[str, str]]:
        """uint8 pixels ``[H, W]`` or ``[H, W, 3]`` (numpy, or a CPU torch tensor) -> (PNG/JPEG bytes,
        ``{"format": ...}``)."""
        arr = np.asarray(pixels)
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

    def decode(self, payload: bytes, meta: dict):
        """PNG/JPEG bytes -> normalised ``[1, C, H, W]`` torch tensor (for the tail); see :meth:`decode_array`."""
        import torch

        return torch.from_numpy(self.decode_array(payload, meta))

    def decode_array(self, payload: bytes, meta: dict) -> np.ndarray:
        """PNG/JPEG bytes -> normalised ``[1, C, H, W]``; the declared format must match the bytes."""
        declared = meta.get("format")
        if declared is not None and declared not in ("png", "jpeg"):
            raise InvalidInput(f"image codec format must be 'png' or 'jpeg', got {declared!r}")
        if not payload:
            raise InvalidInput("empty image payload")
        kind = sniff_format(payload)
        if kind == "npy" or (declared is not None and kind != declared):
            raise InvalidInput(f"image payload is {kind}, not the declared {declared or 'png/jpeg'}")
        return decode_image(payload, self.spec, self.max_image_pixels, setting=self.setting)
