"""A bench-only stand-in for a GPU runtime (never shipped): a forward pass that waits.

Each batch takes a fixed 0.2 ms plus 2 us per image, sleeping rather than computing, as a
GPU's forward pass leaves the CPU free. Served with RUNTIME=bench.sim_device:load, it shows
whether every core's worker can feed one device: the images per second should grow with
WORKERS, since the device is never the limit.
Nothing of Keras is imported: the model folder's labels and input shape are read from its
files, so the runner's CPU goes to the channel and the batching alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from model_folder import files as model_files
from model_folder.files import ModelInfo
from service.settings import Settings

FIXED_S = 0.0002
PER_IMAGE_S = 0.000002
MAX_BATCH_SIZE = 128


class SimulatedDevice:
    """A classifier whose forward pass is a wait, answering uniform probabilities."""

    def __init__(self, info: ModelInfo, max_batch_size: int) -> None:
        self.info = info
        self.max_batch_size = max_batch_size

    def warm_up(self) -> None:
        """Nothing to compile."""

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray:
        time.sleep(FIXED_S + PER_IMAGE_S * len(inputs))
        classes = len(self.info.labels)
        return np.full((len(inputs), classes), 1.0 / classes, dtype=np.float32)


def load(folder: Path, settings: Settings, name: str, version: str) -> SimulatedDevice:
    """Load the model folder's facts (not its weights) as a runner's stand-in runtime does."""
    files = model_files.read(folder, name, version)
    shape = _input_shape(json.loads(files.architecture))
    info = ModelInfo(files.name, files.version, files.labels, files.input_spec(*shape), "GPU:sim")
    return SimulatedDevice(info, settings.max_batch_size or MAX_BATCH_SIZE)


def _input_shape(node: object) -> tuple[int, int, int]:
    """Return the (height, width, channels) of the first input layer's batch shape."""
    if isinstance(node, dict):
        shape = node.get("batch_shape") or node.get("batch_input_shape")
        if isinstance(shape, list) and len(shape) == 4:
            return tuple(shape[1:])  # type: ignore[return-value]
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        children = []
    for child in children:
        try:
            return _input_shape(child)
        except ValueError:
            continue
    raise ValueError("no 4-D input shape in model.json")
