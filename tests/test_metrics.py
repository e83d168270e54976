"""Metrics by value, in process through the Flask test client.

Without PROMETHEUS_MULTIPROC_DIR the service records into prometheus_client's global REGISTRY,
which every test of the session shares, so each test reads a value before and after its own
requests and checks the difference.
"""

from __future__ import annotations

import io

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from service.frontend.app import create_app
from tests.conftest import MODEL_LABELS, RUNNER_LABELS, distinct_images, image_bytes
from tests.fault_app import WrappedClassifier

PREDICT_OK = {"protocol": "http", "endpoint": "/predict", "status": "200"}
PREDICT_BAD = {"protocol": "http", "endpoint": "/predict", "status": "400"}
INVALID_IMAGE = {"code": "invalid_image", "protocol": "http"}


@pytest.fixture(autouse=True)
def in_process_registry(monkeypatch):
    """Make sure the exposition reads the global registry, as it does in process."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def value(name: str, labels: dict[str, str] | None = None) -> float:
    """Return a sample's current value in the global registry; 0 before its first use."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def values(*samples: tuple[str, dict[str, str] | None]) -> list[float]:
    return [value(name, labels) for name, labels in samples]


class BrokenForwardPass(WrappedClassifier):
    """The real classifier, warmed up as usual, whose every forward pass then raises."""

    def predict_batch(self, inputs):
        raise RuntimeError("injected forward-pass failure")


def post_images(client, images: list[bytes]):
    files = [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)]
    return client.post("/predict", data={"image": files})


def test_one_request_of_three_images_counts_three_images(client):
    watched = (
        ("cnn_images_predicted_total", RUNNER_LABELS),
        ("cnn_preprocess_duration_seconds_count", MODEL_LABELS),
        ("cnn_batch_size_sum", RUNNER_LABELS),
        ("cnn_http_request_duration_seconds_count", PREDICT_OK),
    )
    before = values(*watched)
    assert post_images(client, distinct_images(3)).status_code == 200
    after = values(*watched)
    images, preprocessed, batched, requests = (a - b for a, b in zip(after, before, strict=True))
    assert images == 3
    assert preprocessed == 3
    assert batched == 3
    assert requests == 1


def test_each_request_is_one_observation_of_the_request_histogram(client):
    before = value("cnn_http_request_duration_seconds_count", PREDICT_OK)
    for count in (1, 2, 1):
        assert post_images(client, distinct_images(count)).status_code == 200
        before += 1
        assert value("cnn_http_request_duration_seconds_count", PREDICT_OK) == before


def test_each_request_adds_its_duration_to_the_request_histogram(client):
    count = value("cnn_http_request_duration_seconds_count", PREDICT_OK)
    total = value("cnn_http_request_duration_seconds_sum", PREDICT_OK)
    slowest = value("cnn_http_request_duration_seconds_bucket", {**PREDICT_OK, "le": "+Inf"})
    assert post_images(client, distinct_images(1)).status_code == 200
    assert value("cnn_http_request_duration_seconds_count", PREDICT_OK) == count + 1
    assert value("cnn_http_request_duration_seconds_bucket", {**PREDICT_OK, "le": "+Inf"}) == (
        slowest + 1
    )
    assert value("cnn_http_request_duration_seconds_sum", PREDICT_OK) > total


def test_a_bad_image_counts_one_error_and_no_prediction(client):
    watched = (
        ("cnn_errors_total", INVALID_IMAGE),
        ("cnn_images_predicted_total", RUNNER_LABELS),
        ("cnn_batch_size_sum", RUNNER_LABELS),
        ("cnn_http_request_duration_seconds_count", PREDICT_BAD),
        ("cnn_http_request_duration_seconds_count", PREDICT_OK),
    )
    before = values(*watched)
    response = post_images(client, [image_bytes(), b"not an image"])
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_image"
    after = values(*watched)
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0, 0, 1, 0]


def test_queue_depth_is_back_to_its_idle_value_after_requests_and_errors(client):
    idle = value("cnn_batch_queue_depth", RUNNER_LABELS)
    assert post_images(client, distinct_images(3)).status_code == 200
    assert value("cnn_batch_queue_depth", RUNNER_LABELS) == idle
    assert post_images(client, [image_bytes(), b"junk"]).status_code == 400
    assert value("cnn_batch_queue_depth", RUNNER_LABELS) == idle
    assert post_images(client, distinct_images(2)).status_code == 200
    assert value("cnn_batch_queue_depth", RUNNER_LABELS) == idle


def test_a_failed_forward_pass_counts_one_error_no_prediction_and_empties_the_queue(
    settings, classifier
):
    # The images are preprocessed and queued, then their batch fails.
    app = create_app(settings, BrokenForwardPass(classifier))
    watched = (
        ("cnn_errors_total", {"code": "inference_failed", "protocol": "http"}),
        ("cnn_images_predicted_total", RUNNER_LABELS),
        ("cnn_batch_queue_depth", RUNNER_LABELS),
    )
    before = values(*watched)
    try:
        response = post_images(app.test_client(), distinct_images(2))
    finally:
        app.extensions["runner"].close(timeout=5)
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "inference_failed"
    after = values(*watched)
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0, 0]


def test_the_exposition_reports_the_registry_values(client):
    assert post_images(client, distinct_images(3)).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    for name, labels in (
        ("cnn_images_predicted_total", RUNNER_LABELS),
        ("cnn_preprocess_duration_seconds_count", MODEL_LABELS),
        ("cnn_batch_size_sum", RUNNER_LABELS),
        ("cnn_errors_total", INVALID_IMAGE),
        ("cnn_batch_queue_depth", RUNNER_LABELS),
    ):
        assert samples.get((name, tuple(sorted(labels.items()))), 0.0) == value(name, labels)
