"""One served model version: its classifier and batcher, uploads in, probabilities out.

No Flask here. Which versions exist and which request gets which is service.registry's;
loading and swapping them is service.reloader's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model_folder.errors import ImageTooLarge, UndecodableImage
from model_folder.files import ModelInfo
from model_folder.preprocessing import preprocess, to_model_input
from service import metrics
from service.batching import Batcher
from service.errors import InvalidImage, InvalidRequest, ModelNotReady, PayloadTooLarge
from service.settings import Settings


class Classifier(Protocol):
    """What the data plane needs of a model runtime (see service.runtime.Classifier)."""

    info: ModelInfo

    @property
    def max_batch_size(self) -> int: ...

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray: ...

    def warm_up(self) -> None: ...


@dataclass(frozen=True)
class Upload:
    """One image of a request: where it came from (for error messages) and its bytes."""

    name: str
    data: bytes


class ModelVersion:
    """One loaded, warm version of a model: its batcher, and the requests holding it.

    A request holds the version from its lookup to its answer (service.registry leases it),
    so a version being replaced finishes every request already given to it before it closes.
    """

    def __init__(self, classifier: Classifier, settings: Settings) -> None:
        """Warm up `classifier` on a new batcher; return once it takes requests."""
        self.classifier = classifier
        self.info = classifier.info
        self.settings = settings
        self.metrics = metrics.for_model(self.info.name, self.info.version, self.info.labels)
        self.batcher = Batcher(
            classifier.predict_batch,
            max_batch_size=classifier.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            running_grace_s=settings.running_batch_grace_s,
            model_metrics=self.metrics,
            warm_up=classifier.warm_up,
        )
        self.batcher.start()
        self._holders = 0
        self._idle = threading.Condition()

    @property
    def alive(self) -> bool:
        """Tell whether its inference thread runs and takes new work."""
        return self.batcher.alive

    def hold(self) -> None:
        """Count one more request holding this version."""
        with self._idle:
            self._holders += 1

    def release(self) -> None:
        """Count one request fewer; wake `wait_idle` when none is left."""
        with self._idle:
            self._holders -= 1
            if self._holders == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request holds this version; tell whether none does."""
        with self._idle:
            return self._idle.wait_for(lambda: self._holders == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued work and stop the batcher."""
        self.batcher.close(timeout)

    def _serving(self) -> tuple[Batcher, Classifier]:
        if not self.batcher.alive:
            raise ModelNotReady(
                f"model {self.info.name!r} version {self.info.version} has stopped batching"
            )
        return self.batcher, self.classifier

    def predict_tensor(self, batch: np.ndarray, deadline: float) -> list[np.ndarray]:
        """Return the class probabilities of images already at the model's input size.

        `batch` is [N, H, W, C]: uint8 pixels are scaled as the model folder says (as decoded
        uploads are), float32 values are taken as the model's input values.
        """
        batcher, classifier = self._serving()
        spec = classifier.info.spec
        if batch.ndim != 4 or tuple(batch.shape[1:]) != spec.shape:
            raise InvalidRequest(
                f"the tensor's shape is {list(batch.shape)}; the model takes "
                f"[N, {', '.join(map(str, spec.shape))}]"
            )
        if batch.dtype == np.uint8:
            inputs = to_model_input(batch, spec)
        elif batch.dtype == np.float32:
            if not np.isfinite(batch).all():
                raise InvalidRequest("the tensor holds a NaN or an infinity")
            inputs = batch
        else:
            raise InvalidRequest(f"the tensor's type is {batch.dtype}; use uint8 or float32")
        with batcher.arrival() as arrival:
            return arrival.predict(list(inputs), deadline)

    def predict(self, uploads: Sequence[Upload], deadline: float) -> list[np.ndarray]:
        """Preprocess each upload and return its class probabilities, in order."""
        batcher, classifier = self._serving()
        spec = classifier.info.spec
        preprocess_latency = batcher.metrics.preprocess
        with batcher.arrival() as arrival:
            inputs = []
            for upload in uploads:
                started = time.perf_counter()
                try:
                    inputs.append(preprocess(upload.data, spec, self.settings.max_image_pixels))
                except UndecodableImage as exc:
                    raise InvalidImage(f"{upload.name}: {exc}") from None
                except ImageTooLarge as exc:
                    raise PayloadTooLarge(f"{upload.name}: {exc}") from None
                preprocess_latency.observe(time.perf_counter() - started)
            return arrival.predict(inputs, deadline)
