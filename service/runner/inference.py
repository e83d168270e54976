"""One model version in a runner: its classifier and batcher, tensors in, futures out.

Uploads are decoded by the front-end workers (service.frontend.versions); which versions
exist is service.registry's; loading and swapping them is service.runner.reloader's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from model_folder.files import ModelInfo
from model_folder.preprocessing import to_model_input
from service import metrics
from service.channel.wire import Explanation
from service.errors import InvalidRequest, ModelNotReady
from service.runner.batching import Arrival, Batcher
from service.settings import Settings


class Classifier(Protocol):
    """What a runner needs of a model runtime (service.runner.runtime.KerasClassifier)."""

    info: ModelInfo

    @property
    def max_batch_size(self) -> int: ...

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray: ...

    def warm_up(self) -> None: ...


class ModelVersion:
    """One loaded, warm version of a model: its batcher, and the requests holding it.

    A request holds the version from its lookup to its answer (service.registry leases it),
    so a version being replaced finishes every request already given to it before it closes.
    """

    def __init__(
        self,
        classifier: Classifier,
        settings: Settings,
        on_death: Callable[[], None] | None = None,
        runner: str = "0",
    ) -> None:
        """Warm up `classifier` on a new batcher; return once it takes requests. `on_death`
        is called if its inference thread dies; its metrics carry `runner`."""
        self.classifier = classifier
        self.info = classifier.info
        self.settings = settings
        self.metrics = metrics.for_model(
            self.info.name,
            self.info.version,
            self.info.labels,
            runner,
            low_confidence=settings.low_confidence,
            class_series=settings.class_series,
        )
        self.batcher = Batcher(
            classifier.predict_batch,
            max_batch_size=classifier.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            model_metrics=self.metrics,
            warm_up=classifier.warm_up,
            on_death=on_death,
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

    def submit(
        self, tensor: np.ndarray, deadline: float, arrival: Arrival | None = None
    ) -> list[Future]:
        """Queue the images of `tensor` ([N, H, W, C] at the model's input size) for their
        batches; return one future of class probabilities per image, in order.

        uint8 pixels are scaled as the model folder says (decoded uploads are such pixels),
        float32 values are taken as the model's input values. `arrival`, the request's
        announcement, stops being waited for as its images join the queue.
        """
        if not self.batcher.alive:
            raise ModelNotReady(
                f"model {self.info.name!r} version {self.info.version} has stopped batching"
            )
        return self.batcher.submit(list(self._inputs(tensor)), deadline, arrival)

    def explain(self, tensor: np.ndarray) -> Explanation:
        """Return the Grad-CAM of `tensor`'s images (as `submit` takes them), on this thread."""
        explain = getattr(self.classifier, "explain", None)
        if explain is None:
            raise InvalidRequest(f"model {self.info.name!r}'s runtime does not explain")
        layer, top, heatmaps = explain(self._inputs(tensor))
        return Explanation(layer, [int(i) for i in top], heatmaps)

    def _inputs(self, tensor: np.ndarray) -> np.ndarray:
        spec = self.info.spec
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != spec.shape:
            raise InvalidRequest(
                f"the tensor's shape is {list(tensor.shape)}; the model takes "
                f"[N, {', '.join(map(str, spec.shape))}]"
            )
        return to_model_input(tensor, spec) if tensor.dtype == np.uint8 else tensor
