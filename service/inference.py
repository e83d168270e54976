"""The data plane: the model's life cycle, and uploads in, probabilities out (no Flask here)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from service import metrics
from service.batching import Batcher
from service.errors import (
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    ServiceError,
)
from service.model_dir import ModelInfo
from service.preprocessing import preprocess, to_model_input
from service.settings import Settings

log = logging.getLogger(__name__)


class Classifier(Protocol):
    """What the data plane needs of a model runtime (see service.runtime.Classifier)."""

    info: ModelInfo

    @property
    def max_batch_size(self) -> int: ...

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray: ...

    def warm_up(self) -> None: ...


class Status(StrEnum):
    """Where the model service is in its life."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class Upload:
    """One image of a request: where it came from (for error messages) and its bytes."""

    name: str
    data: bytes


class ModelService:
    """Loads and warms the model, owns the batcher, and answers predictions."""

    def __init__(self, settings: Settings, classifier: Classifier | None = None) -> None:
        self.settings = settings
        self.status = Status.STARTING
        self.failure = ""
        self.classifier = classifier
        self.batcher: Batcher | None = None
        self._started = threading.Event()

    def start(self, background: bool) -> None:
        """Load (unless given), warm up and start batching; in a thread when `background`."""
        if background:
            threading.Thread(target=self._start, name="model-loader", daemon=True).start()
        else:
            self._start()

    def wait_started(self, timeout: float) -> bool:
        """Wait until start-up has ended, ready or failed; tell whether it has."""
        return self._started.wait(timeout)

    def _start(self) -> None:
        try:
            self._load_and_warm_up()
        finally:
            self._started.set()

    def _load_and_warm_up(self) -> None:
        started = time.monotonic()
        try:
            classifier = self.classifier or self._load()
            info = classifier.info
            batcher = Batcher(
                classifier.predict_batch,
                max_batch_size=classifier.max_batch_size,
                max_delay_s=self.settings.max_batch_delay_ms / 1000.0,
                max_queue=self.settings.max_queue,
                running_grace_s=self.settings.running_batch_grace_s,
                model_metrics=metrics.for_model(info.name, info.version),
                warm_up=classifier.warm_up,
            )
            batcher.start()
        except ModelLoadError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:
            self._fail(f"model start-up failed: {type(exc).__name__}: {exc}")
            return
        self.classifier, self.batcher = classifier, batcher
        # TensorFlow and Keras leave millions of long-lived objects; the first full collection
        # under load scanned them all and stalled every thread ~150 ms. Freezing them keeps
        # them out of every later collection.
        gc.collect()
        gc.freeze()
        metrics.MODEL_INFO.labels(
            info.name, info.version, "x".join(map(str, info.input_shape)), info.device
        ).set(1)
        if self.status is Status.STARTING:
            self.status = Status.READY
            metrics.READY.set(1)
        log.info(
            "model ready",
            extra={
                "model": info.name,
                "version": info.version,
                "device": info.device,
                "batch_sizes": getattr(classifier, "batch_sizes", None),
                "startup_s": round(time.monotonic() - started, 3),
            },
        )

    def _load(self) -> Classifier:
        from service.runtime import load_classifier  # the only path into Keras

        return load_classifier(
            self.settings.model_dir,
            max_batch_size=self.settings.max_batch_size,
            intra_op_threads=self.settings.tf_threads,
        )

    def _fail(self, message: str) -> None:
        self.status = Status.FAILED
        self.failure = message
        log.error("model failed to start: %s", message)

    @property
    def ready(self) -> bool:
        """Tell whether new predictions are welcome (loaded, warmed, batching, not draining)."""
        return self.status is Status.READY and self.batcher is not None and self.batcher.alive

    @property
    def alive(self) -> bool:
        """Tell whether the process is worth keeping (liveness): not failed, batcher not dead."""
        if self.status is Status.FAILED:
            return False
        return not (self.status is Status.READY and self.batcher and not self.batcher.alive)

    def readiness(self) -> dict[str, object]:
        """Describe the service for /readyz."""
        status = self.status.value
        if self.status is Status.READY and not self.ready:
            status = "batcher_stopped"
        body: dict[str, object] = {"status": status}
        if self.classifier is not None:
            info = self.classifier.info
            body["model"] = {
                "name": info.name,
                "version": info.version,
                "input_shape": list(info.input_shape),
                "classes": len(info.labels),
                "device": info.device,
            }
        if self.failure:
            body["error"] = self.failure
        return body

    def drain(self) -> bool:
        """Report not-ready from now on, still answering what arrives; False if already so."""
        if self.status is Status.DRAINING:
            return False
        self.status = Status.DRAINING
        metrics.READY.set(0)
        log.info("draining: readiness now reports 503")
        return True

    def close(self, timeout: float | None = None) -> None:
        """Finish queued work and stop the batcher."""
        if self.batcher is not None:
            self.batcher.close(timeout)

    def _serving(self) -> tuple[Batcher, Classifier]:
        batcher, classifier = self.batcher, self.classifier
        accepting = self.status in (Status.READY, Status.DRAINING)
        if batcher is None or classifier is None or not accepting or not batcher.alive:
            raise ModelNotReady(f"the model is not ready ({self.readiness()['status']})")
        return batcher, classifier

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
                except ServiceError as exc:
                    exc.message = f"{upload.name}: {exc.message}"
                    raise
                preprocess_latency.observe(time.perf_counter() - started)
            return arrival.predict(inputs, deadline)


class Models:
    """The models served, found by name and version: the one lookup every protocol uses.

    Today that is one model with one version; serving more changes this class, not the
    HTTP layer.
    """

    def __init__(self, services: Sequence[ModelService]) -> None:
        self._services = list(services)

    def __iter__(self) -> Iterator[ModelService]:
        return iter(self._services)

    def find(self, name: str | None = None, version: str | None = None) -> ModelService:
        """Return the model `name` (the default one if None) at `version` (its own if None).

        Raise ModelNotReady while no model is loaded (its name is not known yet), and
        ModelNotFound for a name or version not served.
        """
        for service in self._services:
            if service.classifier is None:
                raise ModelNotReady(f"the model is not ready ({service.readiness()['status']})")
            info = service.classifier.info
            if name in (None, info.name):
                if version not in (None, info.version):
                    raise ModelNotFound(
                        f"model {info.name!r} has no version {version!r}; served: {info.version!r}"
                    )
                return service
        served = ", ".join(repr(s.classifier.info.name) for s in self._services if s.classifier)
        raise ModelNotFound(f"no model named {name!r} is served; served: {served}")
