"""Preprocessing against values made elsewhere: hand-made pixels, numpy, Pillow called directly.

No test compares `preprocess` with itself: every expected array is built by hand or by calling
Pillow's own operation (transpose, draft, resize, convert) on the original image.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model_folder.errors import ImageTooLarge, UndecodableImage
from model_folder.preprocessing import InputSpec, decode_image, preprocess, to_model_input
from tests.conftest import image_bytes, png_bomb

RGB = InputSpec(32, 32, 3)
GRAY = InputSpec(28, 24, 1)
RGB_OF_6x4 = InputSpec(4, 6, 3)
ORIENTATION = 0x0112
BILINEAR = Image.Resampling.BILINEAR
# The op that shows an image stored with EXIF orientation N upright (EXIF 2.3, tag 274).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def encode(image: Image.Image, fmt: str = "PNG", **args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **args)
    return buffer.getvalue()


def with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def asymmetric_rgb(width: int = 6, height: int = 4) -> np.ndarray:
    """Return pixels that no flip or rotation maps onto themselves: every pixel differs."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(y * width + x) * 10 % 256, y * 60, x * 40], axis=-1).astype(np.uint8)


def detailed_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """Return random noise: fine detail, so that decoders and filters visibly differ."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def spec_of(pixels: np.ndarray) -> InputSpec:
    """Return a spec of the array's own size, so that no resize happens."""
    height, width = pixels.shape[:2]
    return InputSpec(height, width, 1 if pixels.ndim == 2 else pixels.shape[2])


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, L = R * 299/1000 + G * 587/1000 + B * 114/1000, in float."""
    return rgb.astype(float) @ np.array([0.299, 0.587, 0.114])


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


@pytest.mark.parametrize(
    ("fmt", "args"),
    [("PNG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})],
)
def test_lossless_formats_decode_to_the_exact_pixels(fmt, args):
    pixels = asymmetric_rgb()
    assert np.array_equal(
        decode_image(encode(Image.fromarray(pixels), fmt, **args), RGB_OF_6x4), pixels
    )


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX", "SGI", "DDS", "QOI", "XBM"])
def test_formats_outside_the_allowlist_are_invalid(fmt):
    image = Image.new("1" if fmt == "XBM" else "RGB", (16, 16))
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).format == fmt, "Pillow itself reads it"
    with pytest.raises(UndecodableImage, match="not a decodable image"):
        decode_image(data, RGB)


@pytest.mark.parametrize(
    "stored", [np.uint16, ">u2"], ids=["I;16 PNG (little-endian)", "I;16B TIFF (big-endian)"]
)
def test_sixteen_bit_grayscale_is_value_over_257_truncated(stored):
    values = np.array([[0, 256, 257, 513, 514, 32896, 33152, 65277, 65534, 65535]])
    if stored == np.uint16:
        data = encode(Image.fromarray(values.astype(np.uint16)), "PNG")
    else:
        image = Image.frombytes("I;16B", (values.shape[1], 1), values.astype(">u2").tobytes())
        data = encode(image, "TIFF")
    # 32896 = 128 * 257; 256/257 and 65534/257 truncate (to 0 and 254), never round up.
    expected = [0, 0, 1, 1, 2, 128, 128, 253, 254, 255]
    assert (values // 257).tolist() == [expected]
    gray = decode_image(data, InputSpec(1, values.shape[1], 1))
    assert gray[..., 0].tolist() == [expected]
    rgb = decode_image(data, InputSpec(1, values.shape[1], 3))
    assert rgb.tolist() == [[[v] * 3 for v in expected]]


def test_thirty_two_bit_integer_grayscale_is_value_over_257_clipped():
    values = np.array([[-5, 0, 256, 514, 32896, 65535, 70000]], dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    expected = np.clip(values // 257, 0, 255)
    assert expected.tolist() == [[0, 0, 0, 2, 128, 255, 255]]
    assert decode_image(data, InputSpec(1, 7, 1))[..., 0].tolist() == expected.tolist()


def test_float_grayscale_is_clipped_and_truncated_not_scaled():
    values = np.array([[-3.0, 0.0, 0.9, 100.7, 254.99, 255.0, 300.0]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert decode_image(data, InputSpec(1, 7, 1))[..., 0].tolist() == [
        [0, 0, 0, 100, 254, 255, 255]
    ]


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied(orientation):
    pixels = asymmetric_rgb()
    stored = Image.fromarray(pixels)
    upright = stored.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else stored
    expected = np.asarray(upright)
    data = encode(stored, "PNG", exif=with_orientation(orientation))
    assert np.array_equal(decode_image(data, spec_of(expected)), expected)


def test_exif_orientation_of_a_jpeg_is_applied():
    # Left half black, right half white; EXIF orientation 3 rotates it 180 degrees.
    image = Image.new("L", (64, 32), 0)
    image.paste(255, (32, 0, 64, 32))
    spec = InputSpec(32, 64, 1)
    rotated = decode_image(encode(image, "JPEG", exif=with_orientation(3), quality=95), spec)
    plain = decode_image(encode(image, "JPEG", quality=95), spec)
    assert plain[:, :16].mean() < 30 and plain[:, -16:].mean() > 225
    assert rotated[:, :16].mean() > 225 and rotated[:, -16:].mean() < 30


@pytest.mark.parametrize("alpha", [0, 1, 64, 128, 200, 254, 255])
def test_partial_alpha_is_composited_on_white(alpha):
    color = (200, 100, 0)
    image = Image.new("RGBA", (3, 2), (*color, alpha))
    a = alpha / 255
    expected = [a * c + (1 - a) * 255 for c in color]
    got = decode_image(encode(image), InputSpec(2, 3, 3))
    assert np.abs(got - np.array(expected)).max() <= 1, (got[0, 0], expected)


def test_alpha_over_white_then_luma_for_a_grayscale_model():
    image = Image.new("RGBA", (3, 2), (200, 100, 0, 128))
    a = 128 / 255
    composited = np.array([a * c + (1 - a) * 255 for c in (200, 100, 0)])
    got = decode_image(encode(image), InputSpec(2, 3, 1))
    assert np.abs(got.astype(float) - luma(composited)).max() <= 1


def test_gray_with_partial_alpha_is_composited_on_white():
    image = Image.new("LA", (3, 2), (100, 128))
    expected = 128 / 255 * 100 + (1 - 128 / 255) * 255
    got = decode_image(encode(image), InputSpec(2, 3, 1))
    assert np.abs(got.astype(float) - expected).max() <= 1


def test_rgb_transparency_key_becomes_white():
    pixels = np.array([[[10, 20, 30], [200, 100, 0]]], dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "PNG", transparency=(10, 20, 30))
    assert decode_image(data, InputSpec(1, 2, 3)).tolist() == [[[255, 255, 255], [200, 100, 0]]]


PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)
INDEXES = np.array([[0, 1, 2, 3, 3, 0], [2, 2, 1, 0, 3, 1]], dtype=np.uint8)


def palette_image() -> Image.Image:
    image = Image.fromarray(INDEXES, "P")
    image.putpalette(PALETTE.flatten().tolist())
    return image


def test_palette_image_becomes_its_palette_colours():
    expected = PALETTE[INDEXES]
    assert np.array_equal(decode_image(encode(palette_image()), InputSpec(2, 6, 3)), expected)


def test_palette_image_for_a_grayscale_model_is_the_luma_of_its_colours():
    got = decode_image(encode(palette_image()), InputSpec(2, 6, 1))[..., 0]
    assert np.abs(got - luma(PALETTE[INDEXES])).max() <= 1


def test_transparent_palette_entry_becomes_white():
    data = encode(palette_image(), "PNG", transparency=3)
    expected = PALETTE[INDEXES].copy()
    expected[INDEXES == 3] = 255
    assert np.array_equal(decode_image(data, InputSpec(2, 6, 3)), expected)


def test_cmyk_converts_as_pillow_converts_it():
    cmyk = np.array(
        [[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255]],
         [[10, 20, 30, 40], [100, 50, 0, 25], [0, 0, 0, 128], [255] * 4, [7, 0, 200, 3]]],
        dtype=np.uint8,
    )  # fmt: skip
    image = Image.fromarray(cmyk, "CMYK")
    got = decode_image(encode(image, "TIFF"), InputSpec(2, 5, 3))
    assert np.array_equal(got, np.asarray(image.convert("RGB")))
    # Pure inks, by hand: no ink is white, full cyan is (0, 255, 255), full black is black.
    assert got[0].tolist() == [
        [255, 255, 255],
        [0, 255, 255],
        [255, 0, 255],
        [255, 255, 0],
        [0, 0, 0],
    ]


def test_rgb_for_a_grayscale_model_is_luma():
    pixels = asymmetric_rgb()
    got = decode_image(encode(Image.fromarray(pixels)), InputSpec(4, 6, 1))[..., 0]
    assert np.abs(got - luma(pixels)).max() <= 1


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert decode_image(buffer.getvalue(), GRAY).max() < 10


def test_resize_is_bilinear_with_a_reducing_gap_of_three():
    source = detailed_rgb(200, 150)
    got = decode_image(encode(source), RGB)
    expected = np.asarray(source.resize((32, 32), BILINEAR, reducing_gap=3.0))
    assert np.array_equal(got, expected)
    for other in (
        source.resize((32, 32), Image.Resampling.NEAREST),
        source.resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0),
        source.resize((32, 32), BILINEAR),
        source.resize((32, 32), BILINEAR, reducing_gap=2.0),
    ):
        assert not np.array_equal(got, np.asarray(other))


def test_resize_takes_width_then_height_without_keeping_the_aspect_ratio():
    source = detailed_rgb(90, 70)
    got = decode_image(encode(source), InputSpec(20, 40, 3))
    assert np.array_equal(got, np.asarray(source.resize((40, 20), BILINEAR, reducing_gap=3.0)))


def test_large_jpeg_is_decoded_in_draft_mode_then_resized():
    data = encode(detailed_rgb(1600, 1200), "JPEG", quality=90)
    drafted = Image.open(io.BytesIO(data))
    drafted.draft(None, (32, 32))
    assert drafted.size == (200, 150), "Pillow decodes at 1/8 scale"
    expected = np.asarray(drafted.convert("RGB").resize((32, 32), BILINEAR, reducing_gap=3.0))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    full_decode = np.asarray(full.resize((32, 32), BILINEAR, reducing_gap=3.0))
    got = decode_image(data, RGB)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, full_decode)


@pytest.mark.parametrize(
    ("stored", "orientation", "spec"),
    [
        ((1024, 1024), 1, InputSpec(32, 256, 3)),  # wide input: draft to 256, not to 32
        ((128, 512), 1, InputSpec(256, 64, 3)),  # draft to (256, 256), not the input's (64, 256)
        ((512, 128), 6, InputSpec(256, 64, 3)),  # turned upright after decoding: still 256 high
    ],
    ids=["wide-input", "portrait", "rotated"],
)
def test_jpeg_draft_requests_the_largest_input_side_both_ways(stored, orientation, spec):
    data = encode(detailed_rgb(*stored), "JPEG", quality=90, exif=with_orientation(orientation))
    side = max(spec.width, spec.height)
    drafted = Image.open(io.BytesIO(data))
    drafted.draft(None, (side, side))
    if orientation in UPRIGHT:
        drafted = drafted.transpose(UPRIGHT[orientation])
    expected = drafted.convert("RGB").resize((spec.width, spec.height), BILINEAR, reducing_gap=3.0)
    assert np.array_equal(decode_image(data, spec), np.asarray(expected))


def test_small_jpeg_is_decoded_at_full_scale():
    data = encode(detailed_rgb(60, 50), "JPEG", quality=90)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    expected = np.asarray(full.resize((32, 32), BILINEAR, reducing_gap=3.0))
    assert np.array_equal(decode_image(data, RGB), expected)


def test_default_scaling_is_value_over_255():
    pixels = np.array([[0, 1, 51, 128, 254, 255]], dtype=np.uint8)
    got = preprocess(encode(Image.fromarray(pixels)), InputSpec(1, 6, 1))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[..., 0], pixels / 255.0, rtol=1e-6)


def test_rescale_and_offset_are_applied_to_decoded_values():
    pixels = np.array([[0, 51, 127, 255]], dtype=np.uint8)
    spec = InputSpec(1, 4, 1, rescale=1 / 127.5, offset=-1.0)
    got = preprocess(encode(Image.fromarray(pixels)), spec)
    np.testing.assert_allclose(got[..., 0], [[-1.0, -0.6, 127 / 127.5 - 1, 1.0]], atol=1e-6)


def test_rescale_and_offset_apply_to_uint8_values():
    spec = InputSpec(2, 2, 1, rescale=2.0, offset=-1.0)
    assert to_model_input(np.full((2, 2, 1), 3, np.uint8), spec).tolist() == [[[5.0]] * 2] * 2


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is text", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n"],
    ids=["empty", "text", "pdf"],
)
def test_non_images_are_invalid(data):
    with pytest.raises(UndecodableImage):
        decode_image(data, RGB)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_invalid(fmt):
    data = image_bytes((200, 200), "RGB", fmt)
    with pytest.raises(UndecodableImage, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], RGB)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_bomb(40000, 40000)
    assert len(bomb) < 10_000
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, RGB)


def test_pixel_limit_is_configurable():
    data = image_bytes((100, 100))
    with pytest.raises(ImageTooLarge, match="10000 pixels; the limit is 9999"):
        decode_image(data, RGB, max_pixels=9999)
    assert decode_image(data, RGB, max_pixels=10000).shape == RGB.shape


@pytest.mark.parametrize("size", [(1, 1), (10000, 1), (1, 3000)])
def test_extreme_aspect_ratios_decode(size):
    assert decode_image(image_bytes(size, "RGB", "PNG"), RGB).shape == (32, 32, 3)


def test_input_spec_refuses_odd_channel_counts():
    with pytest.raises(ValueError, match="channels"):
        InputSpec(32, 32, 4)


def test_default_pixel_limit_is_25_million():
    # Few-KB PNGs claiming the sizes: 5000x5000 is at the limit, 5001x5000 over it.
    assert decode_image(png_bomb(5000, 5000), RGB).shape == RGB.shape
    with pytest.raises(ImageTooLarge, match="25005000 pixels; the limit is 25000000"):
        decode_image(png_bomb(5001, 5000), RGB)


@pytest.mark.parametrize(("height", "width"), [(0, 5), (5, 0), (-1, 5), (5, -1)])
def test_input_spec_refuses_sizes_below_one(height, width):
    with pytest.raises(ValueError, match="input size must be positive"):
        InputSpec(height, width, 3)


def test_a_one_pixel_input_spec_is_accepted():
    spec = InputSpec(1, 1, 1)
    assert decode_image(encode(Image.new("L", (3, 3), 77)), spec).tolist() == [[[77]]]


@pytest.mark.parametrize(("channels", "mode"), [(1, "grayscale"), (3, "rgb")])
def test_input_spec_names_its_color_mode_and_shape(channels, mode):
    spec = InputSpec(28, 24, channels)
    assert spec.color_mode == mode
    assert spec.shape == (28, 24, channels)
