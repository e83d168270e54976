"""Explanations as every protocol answers them: asked for by name, each a Grad-CAM heatmap.

The runner computes the heatmaps (service/runner/gradcam.py); here they become what a client
reads: {"method": "gradcam", "layer": "<conv layer>", "class": "<label>", "heatmap": "<base64
PNG>"}, the PNG a grayscale map at the model's input size, white where the evidence for the
class is strongest.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from service.channel.wire import Explanation
from service.errors import InvalidRequest

GRADCAM = "gradcam"
METHODS = (GRADCAM,)


def requested(value: object) -> bool:
    """Tell whether a request's `explain` parameter asks for an explanation (absent or empty:
    no); refuse a method the service does not have."""
    if value is None or value == "":
        return False
    if value not in METHODS:
        raise InvalidRequest(f"explain must be one of {', '.join(METHODS)}, got {value!r}")
    return True


def described(explanation: Explanation, labels: tuple[str, ...] | list[str]) -> list[dict]:
    """Return each image's explanation as a client reads it."""
    return [
        {
            "method": GRADCAM,
            "layer": explanation.layer,
            "class": labels[int(index)],
            "heatmap": _png(heatmap),
        }
        for index, heatmap in zip(explanation.classes, explanation.heatmaps, strict=True)
    ]


def _png(heatmap: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.uint8), mode="L").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
