"""The built-in synthetic dataset: coloured shapes on noisy backgrounds, deterministic by seed.

Each image holds one shape of random size, position, rotation and colour on a background of
random colour and pixel noise. Shape and background differ in luma as well as colour, so the
task stays learnable in grayscale. Images are drawn at RENDER_SIZE and kept as PNG bytes: the
model reads them through the service's preprocessing, as it would read files from a folder.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
RENDER_SIZE = 64
# Luma difference between shape and background, out of 255: visible, yet not always stark.
MIN_CONTRAST = 60
NOISE_STDDEV = 18.0


def make_images(samples_per_class: int, seed: int) -> list[tuple[bytes, int]]:
    """Return (PNG bytes, class index) pairs, `samples_per_class` of each of SHAPES."""
    rng = np.random.default_rng(seed)
    return [
        (encode_png(draw_shape(shape, rng)), label)
        for _ in range(samples_per_class)
        for label, shape in enumerate(SHAPES)
    ]


def draw_shape(shape: str, rng: np.random.Generator, size: int = RENDER_SIZE) -> Image.Image:
    """Draw one `shape` of random geometry and colour on a noisy background."""
    background, foreground = _contrasting_colours(rng)
    noise = rng.normal(0.0, NOISE_STDDEV, (size, size, 3))
    pixels = np.clip(np.asarray(background, dtype=np.float64) + noise, 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    radius = rng.uniform(0.18, 0.4) * size
    centre = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        x, y = centre
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=foreground)
    else:
        draw.polygon(_outline(shape, centre, radius, angle), fill=foreground)
    return image


def encode_png(image: Image.Image) -> bytes:
    """Return the image as PNG bytes (fast, lossless compression)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        background, foreground = rng.integers(0, 256, (2, 3))
        if abs(luma @ background - luma @ foreground) >= MIN_CONTRAST:
            return tuple(int(v) for v in background), tuple(int(v) for v in foreground)


def _outline(shape: str, centre: np.ndarray, radius: float, angle: float) -> list[float]:
    if shape == "square":
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        points = np.array(corners) * radius / math.sqrt(2)
    elif shape == "triangle":
        turns = np.arange(3) * 2 * math.pi / 3
        points = np.stack([np.cos(turns), np.sin(turns)], axis=1) * radius
    elif shape == "cross":
        arm = radius / 3
        points = np.array(
            [(arm, radius), (-arm, radius), (-arm, arm), (-radius, arm), (-radius, -arm),
             (-arm, -arm), (-arm, -radius), (arm, -radius), (arm, -arm), (radius, -arm),
             (radius, arm), (arm, arm)]
        )  # fmt: skip
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return [float(v) for v in (points @ rotation.T + centre).ravel()]
