"""Preprocessing: every mode and format to the model's input; hostile bytes to typed errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidImage, PayloadTooLarge
from service.preprocessing import InputSpec, decode_image, preprocess, to_model_input
from tests.conftest import image_bytes, png_bomb

RGB = InputSpec(32, 32, 3)
GRAY = InputSpec(28, 24, 1)


def encode(image: Image.Image, fmt: str = "PNG", **args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **args)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
        ("CMYK", "JPEG"), ("RGB", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF"), ("RGB", "GIF"),
    ],
)  # fmt: skip
def test_every_mode_and_format_becomes_the_input_shape(mode, fmt):
    for spec in (RGB, GRAY):
        array = preprocess(image_bytes((50, 37), mode, fmt), spec)
        assert array.shape == spec.shape
        assert array.dtype == np.float32
        assert array.min() >= 0.0 and array.max() <= 1.0


def test_palette_and_sixteen_bit_images_decode():
    palette = Image.new("P", (20, 20), 3)
    assert decode_image(encode(palette), RGB).shape == (32, 32, 3)
    sixteen = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    pixels = decode_image(encode(sixteen), GRAY)
    assert pixels.shape == (28, 24, 1)
    assert (pixels == 255).all(), "16-bit white must scale to 8-bit white, value / 257"


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (decode_image(encode(clear), RGB) == 255).all()
    opaque = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    assert (decode_image(encode(opaque), RGB)[..., 0] == 255).all()
    assert (decode_image(encode(opaque), RGB)[..., 1] == 0).all()


def test_exif_orientation_is_applied():
    # Left half black, right half white; EXIF orientation 3 rotates it 180 degrees.
    image = Image.new("L", (64, 32), 0)
    image.paste(255, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 3
    rotated = decode_image(encode(image, "JPEG", exif=exif, quality=95), InputSpec(32, 64, 1))
    plain = decode_image(encode(image, "JPEG", quality=95), InputSpec(32, 64, 1))
    assert plain[:, :16].mean() < 30 and plain[:, -16:].mean() > 225
    assert rotated[:, :16].mean() > 225 and rotated[:, -16:].mean() < 30


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert decode_image(buffer.getvalue(), GRAY).max() < 10


def test_large_jpeg_is_decoded_at_reduced_scale_and_resized():
    photo = image_bytes((1600, 1200), "RGB", "JPEG", color=(200, 50, 25))
    pixels = decode_image(photo, RGB)
    assert pixels.shape == (32, 32, 3)
    assert np.abs(pixels.astype(int) - [200, 50, 25]).max() <= 3


def test_rescale_and_offset_apply_to_uint8_values():
    spec = InputSpec(2, 2, 1, rescale=2.0, offset=-1.0)
    assert to_model_input(np.full((2, 2, 1), 3, np.uint8), spec).tolist() == [[[5.0]] * 2] * 2


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is text", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n"],
    ids=["empty", "text", "pdf"],
)
def test_non_images_are_invalid(data):
    with pytest.raises(InvalidImage):
        decode_image(data, RGB)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_invalid(fmt):
    data = image_bytes((200, 200), "RGB", fmt)
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], RGB)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_bomb(40000, 40000)
    assert len(bomb) < 10_000
    with pytest.raises(PayloadTooLarge):
        decode_image(bomb, RGB)


def test_pixel_limit_is_configurable():
    data = image_bytes((100, 100))
    with pytest.raises(PayloadTooLarge, match="10000 pixels; the limit is 9999"):
        decode_image(data, RGB, max_pixels=9999)


@pytest.mark.parametrize("size", [(1, 1), (10000, 1), (1, 3000)])
def test_extreme_aspect_ratios_decode(size):
    assert decode_image(image_bytes(size, "RGB", "PNG"), RGB).shape == (32, 32, 3)


def test_input_spec_refuses_odd_channel_counts():
    with pytest.raises(ValueError, match="channels"):
        InputSpec(32, 32, 4)
