"""A test-only gunicorn app: the real service around a model that misbehaves on command.

The model is the real one loaded from MODEL_DIR, wrapped so that a batch holding an image
of one flat colour does something bad: all black (0) fails the forward pass, all white (255)
kills the inference thread, mid grey (128) makes the forward pass take SLOW_S seconds.
Run: gunicorn -c python:service.gunicorn_conf 'tests.fault_app:create()'
"""

from __future__ import annotations

import time

import numpy as np

from service.app import create_app
from service.runtime import load_classifier
from service.settings import Settings

SLOW_S = 2.0


class MisbehavingClassifier:
    """The real classifier, failing, dying or stalling when a trigger image is in the batch."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = inner.info
        spec = inner.info.spec
        self.triggers = {v: np.float32(v) * np.float32(spec.rescale) + np.float32(spec.offset)
                         for v in (0, 128, 255)}  # fmt: skip

    @property
    def max_batch_size(self) -> int:
        return self.inner.max_batch_size

    def warm_up(self) -> None:
        self.inner.warm_up()

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray:
        flat = [float(x.flat[0]) for x in inputs if x.min() == x.max()]
        if self.triggers[0] in flat:
            raise RuntimeError("injected forward-pass failure")
        if self.triggers[255] in flat:
            raise SystemExit("injected death of the inference thread")
        if self.triggers[128] in flat:
            time.sleep(SLOW_S)
        return self.inner.predict_batch(inputs)


def create():
    """Build the service app around the misbehaving model."""
    settings = Settings.from_env()
    inner = load_classifier(settings.model_dir, settings.max_batch_size, settings.tf_threads)
    return create_app(settings, MisbehavingClassifier(inner))
