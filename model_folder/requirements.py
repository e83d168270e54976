"""What writing (training) and loading (serving) a model folder with Keras needs installed."""

from __future__ import annotations

import importlib.util


def missing_tensorflow() -> str:
    """Return why TensorFlow cannot be imported and which extra brings it, or "" if it can."""
    if importlib.util.find_spec("tensorflow") is not None:
        return ""
    return (
        "TensorFlow is not installed; install the package with one of its builds: "
        "pip install 'cnn-serving[cpu]' (or 'cnn-serving[gpu]' on a CUDA machine)"
    )
