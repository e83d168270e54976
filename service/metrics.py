"""Every Prometheus metric of the service, defined once, and the /metrics exposition.

Under gunicorn, PROMETHEUS_MULTIPROC_DIR is set (and wiped) by the launcher before any worker
imports this module, so each worker writes its values to files there and a scrape of any
worker merges them all through a fresh MultiProcessCollector registry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

from model_folder.files import ModelInfo
from service import metric_values
from service.metric_classes import ClassCounts

# Before any metric exists, so that every value lives in a file whose space is reserved: a
# full metrics folder then costs metrics, never a worker (see service/metric_values.py).
METRIC_WRITE_FAILURES_NAME = "cnn_metrics_write_failures_total"
metric_values.install(failure_counter=METRIC_WRITE_FAILURES_NAME)

# Millisecond-scale buckets: a 32x32 image is answered in a few ms, a batch queued behind a
# burst or a big upload in tens to hundreds.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A model's confidence in its answers: where most top-1 probabilities fall, and how that moves.
PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Loading and warming one version: a second for a small CNN, minutes for a large one.
LOAD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

# The first metric: its slot is made first, so it can be exported whenever anything can.
METRIC_WRITE_FAILURES = Counter(
    METRIC_WRITE_FAILURES_NAME,
    "Metric samples a worker had to keep in memory because the metrics folder had no room "
    "for them (each counted once; written there once there is room).",
)

# The labels of every per-model metric: which model, and which of its versions; and of the
# batch, queue and forward-pass metrics, which runner too.
MODEL_LABELS = ["model", "version"]
RUNNER_LABELS = [*MODEL_LABELS, "runner"]

# The front end a request came through: HTTP (every REST protocol) or gRPC.
HTTP, GRPC = "http", "grpc"

REQUEST_LATENCY = Histogram(
    "cnn_http_request_duration_seconds",
    "Time from request arrival to response, by protocol (http or grpc), endpoint (a route or "
    "a gRPC method) and status (an HTTP status or a gRPC code).",
    ["protocol", "endpoint", "status"],
    buckets=LATENCY_BUCKETS,
)
MODEL_REQUEST_LATENCY = Histogram(
    "cnn_model_request_duration_seconds",
    "Time from request arrival to response of the requests a model version answered.",
    MODEL_LABELS,
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "cnn_batch_queue_wait_seconds",
    "Time an image waited in the batch queue before its forward pass began.",
    RUNNER_LABELS,
    buckets=LATENCY_BUCKETS,
)
INFERENCE_LATENCY = Histogram(
    "cnn_inference_duration_seconds",
    "Time of one forward pass over a (padded) batch.",
    RUNNER_LABELS,
    buckets=LATENCY_BUCKETS,
)
PREPROCESS_LATENCY = Histogram(
    "cnn_preprocess_duration_seconds",
    "Time to decode, convert and resize one image.",
    MODEL_LABELS,
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "cnn_batch_size",
    "Images in one forward pass, before padding.",
    RUNNER_LABELS,
    buckets=BATCH_SIZE_BUCKETS,
)
IMAGES_PREDICTED = Counter(
    "cnn_images_predicted_total", "Images run through the model.", RUNNER_LABELS
)
ERRORS = Counter(
    "cnn_errors_total", "Error responses, by error code and protocol.", ["code", "protocol"]
)
REQUEST_ARRIVAL = Histogram(
    "cnn_http_request_arrival_seconds",
    "Time from a request's first byte to its last, read by the worker's event loop.",
    buckets=LATENCY_BUCKETS,
)
REQUESTS_ARRIVING = Gauge(
    "cnn_http_requests_arriving",
    "Connections whose next request is still arriving (or not yet begun), over live workers.",
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "cnn_batch_queue_depth",
    "Images waiting in the batch queues of all live runners.",
    RUNNER_LABELS,
    multiprocess_mode="livesum",
)
ESTIMATED_WAIT = Gauge(
    "cnn_batch_queue_estimated_wait_seconds",
    "Estimated wait of an image enqueued now (largest over live runners).",
    RUNNER_LABELS,
    multiprocess_mode="livemax",
)
READY = Gauge(
    "cnn_ready",
    "1 while a worker's model is loaded, warmed up and its batcher runs (sum over workers).",
    multiprocess_mode="livesum",
)
MODEL_INFO = Gauge(
    "cnn_model_info",
    "A model version served (1) or no longer (0), its facts in the labels.",
    ["name", "version", "input_shape", "device"],
    multiprocess_mode="livemax",
)
VERSION_WORKERS = Gauge(
    "cnn_model_version_workers",
    "Live workers whose view of the runners serves each model version: during a rollout, "
    "old and new side by side.",
    MODEL_LABELS,
    multiprocess_mode="livesum",
)
SERVING_VERSION = Gauge(
    "cnn_model_serving_version",
    "The newest version of each model a worker serves (the highest over live workers).",
    ["model"],
    multiprocess_mode="livemax",
)
MODEL_LOAD_SECONDS = Histogram(
    "cnn_model_load_seconds",
    "Time to load and warm up one model version, before it serves.",
    ["model"],
    buckets=LOAD_BUCKETS,
)
MODEL_LOAD_FAILURES = Counter(
    "cnn_model_load_failures_total",
    "Model versions refused at load (bad files, unsafe layers, weights that do not fit).",
    MODEL_LABELS,
)
RUNNER_RESTARTS = Counter(
    "cnn_runner_restarts_total",
    "Runners started again after theirs ended (killed, out of memory, failed), by runner.",
    ["runner"],
)
PREDICTED_CLASS = Counter(
    "cnn_predicted_class_total",
    "Images answered, by the class the model ranked first (the most frequent classes, the "
    'rest as class="other"): a shift after a rollout is drift.',
    [*MODEL_LABELS, "class"],
)
LOW_CONFIDENCE = Counter(
    "cnn_low_confidence_total",
    "Images answered with a top-class probability below LOW_CONFIDENCE.",
    MODEL_LABELS,
)
TOP1_PROBABILITY = Histogram(
    "cnn_top1_probability",
    "The probability of each answer's top class: the model's confidence, per version.",
    MODEL_LABELS,
    buckets=PROBABILITY_BUCKETS,
)


@dataclass(frozen=True)
class ModelMetrics:
    """One model version's metrics in one runner, bound to their labels once."""

    queue_wait: Histogram
    inference: Histogram
    batch_size: Histogram
    images: Counter
    queue_depth: Gauge
    estimated_wait: Gauge
    top1: Histogram
    predicted_class: ClassCounts
    low_confidence: Counter
    low_confidence_below: float

    def record_outputs(self, outputs: np.ndarray) -> None:
        """Count each answer's top class and observe its probability, for a batch (N, classes)."""
        outputs = np.asarray(outputs)
        if outputs.ndim != 2 or not outputs.size:
            return
        top = outputs.argmax(axis=1)
        self.predicted_class.add(top)
        probabilities = outputs[np.arange(len(outputs)), top]
        for probability in probabilities.tolist():
            self.top1.observe(probability)
        low = int(np.count_nonzero(probabilities < self.low_confidence_below))
        if low:
            self.low_confidence.inc(low)


@dataclass(frozen=True)
class RequestMetrics:
    """One model version's metrics in one worker: its requests and their decoding."""

    preprocess: Histogram
    request: Histogram


def for_model(
    name: str,
    version: str,
    classes: Sequence[str] = (),
    runner: str = "0",
    *,
    low_confidence: float = 0.5,
    class_series: int = 50,
) -> ModelMetrics:
    """Return the metrics of model `name` at `version` in `runner`; its outputs are `classes`.
    Answers under `low_confidence` are counted as such; `class_series` classes at most get a
    series of their own (LOW_CONFIDENCE and CLASS_SERIES)."""
    return ModelMetrics(
        QUEUE_WAIT.labels(name, version, runner),
        INFERENCE_LATENCY.labels(name, version, runner),
        BATCH_SIZE.labels(name, version, runner),
        IMAGES_PREDICTED.labels(name, version, runner),
        QUEUE_DEPTH.labels(name, version, runner),
        ESTIMATED_WAIT.labels(name, version, runner),
        TOP1_PROBABILITY.labels(name, version),
        ClassCounts(PREDICTED_CLASS, name, version, classes, class_series),
        LOW_CONFIDENCE.labels(name, version),
        low_confidence,
    )


def for_requests(name: str, version: str) -> RequestMetrics:
    """Return the request metrics of model `name` at `version`, in a worker."""
    return RequestMetrics(
        PREPROCESS_LATENCY.labels(name, version), MODEL_REQUEST_LATENCY.labels(name, version)
    )


def version_serving(info: ModelInfo, serving: bool) -> None:
    """Record that this runner serves model version `info` now, or no longer."""
    shape = "x".join(map(str, info.input_shape))
    MODEL_INFO.labels(info.name, info.version, shape, info.device).set(1 if serving else 0)


def version_in_worker(model: str, version: str, serving: bool) -> None:
    """Record that this worker's view of the runners holds `model` `version`, or no longer."""
    VERSION_WORKERS.labels(model, version).set(1 if serving else 0)


def serve_separately(host: str, port: int) -> None:
    """Serve /metrics of all workers on their own port, from a thread of this process."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)


def exposition() -> tuple[bytes, str]:
    """Return the current metrics in the Prometheus text format, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
