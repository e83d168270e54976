"""The peer of bench/peer.py: the reference CNN served by BentoML 1.4, as its user would write it.

Run in its own venv (bench/peer.py makes it): `bentoml serve peer_bentoml:Classifier` from a
folder holding this file, with PEER_MODEL_DIR the model folder (model.json,
model.weights.h5). POST /classify takes a multipart form with the image(s) in the field
`images` and answers the softmax probabilities, one row per image. Pixels get what the
service's model_folder/preprocessing.py does to them, so that both sides do the same work
and give the same answers: a JPEG decoded at reduced scale (Pillow's draft mode), EXIF
orientation applied, RGB, bilinear resize with reducing_gap=3.0, value / 255 as float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image, ImageOps

# The batch limit of the service on a CPU (MAX_BATCH_SIZE=0 there), so both batch alike.
MAX_BATCH_SIZE = 32


def to_input(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Return one float32 model input (H, W, 3) from an uploaded image."""
    if image.format == "JPEG":
        image.draft(None, (max(width, height), max(width, height)))
    image = ImageOps.exif_transpose(image).convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8).astype(np.float32) * np.float32(1 / 255)


# No access log line per request: the service writes none either (its metrics count requests).
@bentoml.service(workers=2, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self) -> None:
        import keras

        folder = Path(os.environ["PEER_MODEL_DIR"])
        self.model = keras.models.model_from_json((folder / "model.json").read_text())
        self.model.load_weights(folder / "model.weights.h5")
        self.height, self.width = self.model.input_shape[1:3]

    # max_latency_ms: BentoML answers 503 to a request it expects to wait longer; 10 s is the
    # service's REQUEST_TIMEOUT_S (and wrk's timeout), not the default 60 s.
    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=10_000)
    def classify(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([to_input(image, self.height, self.width) for image in images])
        # predict_on_batch, not predict: about 1 ms a call here at batch 1, predict about 45.
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)
