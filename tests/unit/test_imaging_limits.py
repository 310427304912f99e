"""Image size limits: large photos are decoded at reduced size, the limit bounds the decoded pixels, and every
refusal names the setting that raises it (never Pillow's decompression-bomb wording)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edge_agent.settings import EdgeSettings
from splitinfer.bundle import InputSpec
from splitinfer.errors import InvalidInput
from splitinfer.imaging import ImageCodec, InputTooLarge, decode_image, decode_upload

DEFAULT_LIMIT = EdgeSettings.model_fields["max_image_pixels"].default
PHONE = (4032, 3024)  # a 12-megapixel phone photo


def make_spec(c: int, h: int, w: int) -> InputSpec:
    return InputSpec(shape=[c, h, w], mean=[0.5] * c, std=[0.25] * c, labels=["a", "b"])


RGB224 = make_spec(3, 224, 224)
GREY28 = make_spec(1, 28, 28)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def assert_names_the_setting(exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert "max_image_pixels" in msg and "SPLITINFER_EDGE_MAX_IMAGE_PIXELS" in msg, msg
    assert "decompression bomb" not in msg.lower() and "DOS attack" not in msg, msg


def segment(marker: int, body: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body


def solid_grey_jpeg(width: int, height: int, sof: int = 0xC0, components: int = 1, scan_components: int = 1,
                    with_data: bool = True) -> bytes:
    """A valid grey baseline JPEG of any size in ~size/256 bytes, without ever holding its pixels.

    Huffman tables with one 1-bit code each (DC difference 0, end of block): every 8x8 block is the two bits
    00, so the scan is zero bytes. The other arguments craft headers only (no decodable data for them).
    """
    dqt = segment(0xDB, b"\x00" + b"\x01" * 64)
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    sof_seg = segment(sof, struct.pack(">BHHB", 8, height, width, components) + comps)
    one_code = bytes([1] + [0] * 15) + b"\x00"
    dht = segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code)
    sos = segment(0xDA, bytes([scan_components]) + b"".join(bytes([i + 1, 0]) for i in range(scan_components))
                  + b"\x00\x3f\x00")
    blocks = -(-width // 8) * -(-height // 8)
    data = bytes(-(-2 * blocks // 8)) if with_data else b""
    return b"\xff\xd8" + dqt + sof_seg + dht + sos + data + b"\xff\xd9"


def png_with_size(width: int, height: int) -> bytes:
    """A small PNG whose IHDR claims ``width x height`` (CRC fixed; the pixel data is a 1x1 image's)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


@pytest.fixture(scope="module")
def phone_pixels() -> np.ndarray:
    """4032x3024 RGB with structure (dark left, bright right, a red disc) and noise, like a photo."""
    rng = np.random.default_rng(0)
    w, h = PHONE
    grey = np.linspace(20, 230, w).astype(np.int16)[None, :] + rng.integers(-12, 13, size=(h, w), dtype=np.int16)
    img = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    yy, xx = np.ogrid[:h, :w]
    img[((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (h / 5) ** 2] = (220, 30, 30)
    return img


@pytest.fixture(scope="module")
def phone_jpeg(phone_pixels) -> bytes:
    return encode(Image.fromarray(phone_pixels), quality=85)


@pytest.mark.parametrize("spec", [RGB224, GREY28], ids=["rgb224", "grey28"])
def test_12_megapixel_photo_is_decoded_at_reduced_size_with_default_settings(phone_jpeg, spec):
    x = decode_upload(phone_jpeg, spec, DEFAULT_LIMIT)
    assert x.shape == (1, *spec.shape) and x.dtype == np.float32
    assert x[..., : spec.shape[2] // 8].mean() < x[..., -spec.shape[2] // 8:].mean()  # dark left, bright right
    # the limit bounds the decoded size (504x378 here), not the header's 12 M pixels
    assert decode_upload(phone_jpeg, spec, 504 * 378).shape == x.shape
    with pytest.raises(InputTooLarge, match=r"4032x3024 .*504x378") as exc:
        decode_upload(phone_jpeg, RGB224, 504 * 378 - 1)
    assert_names_the_setting(exc)


def test_progressive_12_megapixel_photo_counts_at_full_size(phone_pixels):
    progressive = encode(Image.fromarray(phone_pixels), quality=85, progressive=True)
    assert decode_upload(progressive, RGB224, DEFAULT_LIMIT).shape == (1, 3, 224, 224)
    with pytest.raises(InputTooLarge, match="progressive") as exc:
        decode_upload(progressive, RGB224, 12_000_000)
    assert_names_the_setting(exc)


def test_20000x20000_jpeg_is_drafted_not_refused_with_pillows_wording():
    data = solid_grey_jpeg(20000, 20000)
    with pytest.raises(Image.DecompressionBombError):  # what Image.open alone would answer
        Image.open(io.BytesIO(data))
    x = decode_upload(data, GREY28, DEFAULT_LIMIT)  # decoded at 1/8: 2500x2500
    assert x.shape == (1, 1, 28, 28)
    assert np.allclose(x, np.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-3)
    with pytest.raises(InputTooLarge, match=r"20000x20000 .*2500x2500") as exc:
        decode_upload(data, GREY28, 2500 * 2500 - 1)  # refused from the header alone
    assert_names_the_setting(exc)


def test_jpeg_too_large_after_draft_for_a_large_model_input():
    data = solid_grey_jpeg(20000, 20000, with_data=False)  # refused before the (absent) pixel data is read
    with pytest.raises(InputTooLarge, match=r"5000x5000 decoded for this model's 3000x3000 input") as exc:
        decode_upload(data, make_spec(1, 3000, 3000), DEFAULT_LIMIT)
    assert_names_the_setting(exc)


@pytest.mark.parametrize(("sof", "components", "scan_components", "why"), [
    (0xC0, 1, 1, "smallest scale"),
    (0xC2, 3, 1, "progressive"),
    (0xC0, 3, 1, "multi-scan"),
    (0xC3, 1, 1, "lossless"),
])
def test_absurd_jpeg_headers_are_refused_before_decoding(sof, components, scan_components, why):
    data = solid_grey_jpeg(65535, 65535, sof, components, scan_components, with_data=False)
    with pytest.raises(InputTooLarge, match=why) as exc:
        decode_upload(data, GREY28, DEFAULT_LIMIT)
    assert_names_the_setting(exc)


def test_png_counts_at_full_size():
    data = encode(Image.new("L", (2100, 2100), 90), "PNG")
    assert decode_upload(data, GREY28, 2100 * 2100).shape == (1, 1, 28, 28)
    with pytest.raises(InputTooLarge, match=r"2100x2100 pixels \(PNG, decoded at full size\)") as exc:
        decode_upload(data, GREY28, 2100 * 2100 - 1)
    assert_names_the_setting(exc)
    with pytest.raises(InputTooLarge) as exc:
        decode_upload(png_with_size(100_000, 100_000), GREY28, DEFAULT_LIMIT)
    assert_names_the_setting(exc)


def test_baseline_jpeg_accepted_where_the_same_png_is_refused():
    img = Image.new("RGB", (2100, 2100), (10, 200, 30))
    with pytest.raises(InputTooLarge):
        decode_upload(encode(img, "PNG"), RGB224, 4_000_000)
    assert decode_upload(encode(img), RGB224, 4_000_000).shape == (1, 3, 224, 224)


def test_truncated_big_jpeg_gets_a_clear_error(phone_jpeg):
    for cut in (len(phone_jpeg) // 2, len(phone_jpeg) - 100):
        with pytest.raises(InvalidInput, match="truncated") as exc:
            decode_upload(phone_jpeg[:cut], RGB224, DEFAULT_LIMIT)
        assert not isinstance(exc.value, InputTooLarge)
    big = solid_grey_jpeg(20000, 20000)
    with pytest.raises(InvalidInput, match="truncated"):
        decode_upload(big[: len(big) // 2], GREY28, DEFAULT_LIMIT)
    with pytest.raises(InvalidInput, match="truncated JPEG: the file ends"):
        decode_upload(phone_jpeg[:100], RGB224, DEFAULT_LIMIT)


def test_malformed_jpeg_headers():
    no_sof = b"\xff\xd8" + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x00" * 8
    with pytest.raises(InvalidInput, match="no SOF marker"):
        decode_upload(no_sof, GREY28)
    two_sofs = solid_grey_jpeg(8, 8).replace(b"\xff\xc4", segment(0xC0, struct.pack(">BHHB", 8, 8, 8, 1)
                                                                     + b"\x01\x11\x00") + b"\xff\xc4", 1)
    with pytest.raises(InvalidInput, match="two frame headers"):
        decode_upload(two_sofs, GREY28)
    with pytest.raises(InvalidInput, match="empty size"):
        decode_upload(solid_grey_jpeg(0, 8, with_data=False), GREY28)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    """Stored landscape with its top half bright and orientation 6 (turn 90 degrees clockwise to view):
    upright, the bright half is on the right."""
    arr = np.zeros((64, 128), dtype=np.uint8)
    arr[:32] = 255
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    spec = make_spec(1, 32, 16)  # portrait input, as the upright picture
    x = decode_image(encode(im, fmt, exif=exif.tobytes()), spec, DEFAULT_LIMIT)[0, 0]
    assert x.shape == (32, 16)
    assert x[:, :6].mean() < -1.5 and x[:, -6:].mean() > 1.5
    plain = decode_image(encode(im, fmt), make_spec(1, 16, 32), DEFAULT_LIMIT)[0, 0]  # no EXIF: as stored
    assert plain[:6].mean() > 1.5 and plain[-6:].mean() < -1.5


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_broken_exif_block_does_not_refuse_the_picture():
    data = encode(Image.new("L", (40, 30), 200), exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    assert decode_image(data, GREY28, DEFAULT_LIMIT).shape == (1, 1, 28, 28)


def test_image_codec_refusal_names_its_own_limit():
    codec = ImageCodec(GREY28, max_image_pixels=100)
    with pytest.raises(InputTooLarge, match="image codec's max_image_pixels"):
        codec.decode(encode(Image.new("L", (20, 20)), "PNG"), {"format": "png"})


def test_default_limit_and_its_description():
    assert PHONE[0] * PHONE[1] <= DEFAULT_LIMIT  # even a progressive 12 MP JPEG (full-size count) is accepted
    assert "decode" in EdgeSettings.model_fields["max_image_pixels"].description
