"""Pillow against libjpeg-turbo through simplejpeg, for the service's JPEG preprocessing.

Run: pip install simplejpeg && python bench/jpeg_decoders.py. Both decode at a reduced scale
(Pillow's draft mode, simplejpeg's min_height/min_width) and resize with the same Pillow
filter, so the outputs can be compared bit for bit with model_folder.preprocessing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import encode, photo_like
from model_folder.preprocessing import REDUCING_GAP, RESAMPLE, InputSpec, decode_image

SIZES = ((640, 480), (1920, 1080), (4000, 3000))


def turbo_decode(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode with simplejpeg at the smallest scale that covers the spec, then resize."""
    import simplejpeg

    pixels = simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_height=spec.height, min_width=spec.width
    )
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((spec.width, spec.height), RESAMPLE, reducing_gap=REDUCING_GAP))


def per_call_ms(decode, data: bytes, spec: InputSpec, seconds: float = 1.0) -> float:
    decode(data, spec)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode(data, spec)
        calls += 1
    return (time.perf_counter() - started) / calls * 1000


def main() -> int:
    spec, rng = InputSpec(32, 32, 3), np.random.default_rng(0)
    print("| JPEG | Pillow ms | simplejpeg ms | Pillow / simplejpeg | identical output |")
    print("|---|---:|---:|---:|---|")
    for width, height in SIZES:
        data = encode(photo_like(width, height, rng), "JPEG", quality=90)
        pillow = per_call_ms(decode_image, data, spec)
        turbo = per_call_ms(turbo_decode, data, spec)
        same = np.array_equal(decode_image(data, spec), turbo_decode(data, spec))
        print(f"| {width}x{height} | {pillow:.2f} | {turbo:.2f} | {pillow / turbo:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
