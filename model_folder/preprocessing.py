"""Turn image bytes into the model's input array; shared by serving and training.

The rules, applied in this order:
- Formats: JPEG, PNG, GIF, BMP, WebP and TIFF; anything else is an UndecodableImage.
- Size: an image over `max_pixels` (width x height, read from the header before decoding)
  is refused with ImageTooLarge, so a decompression bomb never reaches memory.
- JPEG is decoded at reduced scale (Pillow's draft mode, 1/2 to 1/8) when the image is
  at least twice the input size: the DCT skips most of the work for photo uploads.
- EXIF orientation is applied; of an animated image the first frame is used.
- Alpha is composited onto a white background, as a browser shows it on a white page.
- 16-bit grayscale is scaled to 8 bits (value / 257); CMYK, palette and the rest convert
  through Pillow to RGB or L ("L" is ITU-R 601-2 luma).
- Resizing to the input (W, H) uses bilinear filtering with antialiasing, with Pillow's
  `reducing_gap=3.0` (a box reduction first for large downscales), aspect ratio not kept.
- Model input = uint8 value * rescale + offset, as float32.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from model_folder.errors import ImageTooLarge, UndecodableImage

ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0
DEFAULT_MAX_PIXELS = 25_000_000
# Model input = uint8 value * rescale + offset, unless metadata.json says otherwise.
DEFAULT_RESCALE = 1.0 / 255.0
DEFAULT_OFFSET = 0.0
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: (height, width, channels) and the pixel scaling."""

    height: int
    width: int
    channels: int
    rescale: float = DEFAULT_RESCALE
    offset: float = DEFAULT_OFFSET

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"input channels must be 1 or 3, got {self.channels}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")

    @property
    def color_mode(self) -> str:
        """Return "grayscale" or "rgb"."""
        return "grayscale" if self.channels == 1 else "rgb"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Return the (height, width, channels) of one input."""
        return (self.height, self.width, self.channels)


def decode_image(data: bytes, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a uint8 array of the spec's (height, width, channels)."""
    if not data:
        raise UndecodableImage("the upload is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"image has more than {max_pixels} pixels") from None
    except Exception:
        raise UndecodableImage(
            "not a decodable image (accepted: " + ", ".join(ACCEPTED_FORMATS) + ")"
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        try:
            return _decode(image, spec)
        except Exception:
            raise UndecodableImage(
                f"the {image.format} image is truncated or corrupt and cannot be decoded"
            ) from None


def to_model_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Scale uint8 pixels to the model's float32 input values."""
    return pixels.astype(np.float32) * np.float32(spec.rescale) + np.float32(spec.offset)


def preprocess(data: bytes, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Turn image bytes into one float32 model input of shape spec.shape."""
    return to_model_input(decode_image(data, spec, max_pixels), spec)


def _decode(image: Image.Image, spec: InputSpec) -> np.ndarray:
    if image.format == "JPEG":
        # Largest side requested, so a 90-degree EXIF rotation still leaves enough pixels.
        side = max(spec.width, spec.height)
        image.draft(None, (side, side))
    image = ImageOps.exif_transpose(image)
    image = _convert(image, grayscale=spec.channels == 1)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), RESAMPLE, reducing_gap=REDUCING_GAP)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(spec.shape)


def _convert(image: Image.Image, grayscale: bool) -> Image.Image:
    target = "L" if grayscale else "RGB"
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if image.mode != "F":
            values = values / 257.0
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        image = background
    return image if image.mode == target else image.convert(target)
