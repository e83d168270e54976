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


def test_answers_under_low_confidence_are_counted_per_version(model_dir, classifier):
    from dataclasses import replace

    from tests.conftest import expected_probabilities, make_cnn

    images = distinct_images(6)
    model = make_cnn()
    model.load_weights(model_dir / "2" / "model.weights.h5")
    top1 = [float(expected_probabilities(model, d, classifier.info.spec).max()) for d in images]
    # A threshold between the answers' confidences, so that some are under it and some not.
    threshold = float(sorted(top1)[2] + sorted(top1)[3]) / 2
    under = sum(p < threshold for p in top1)
    assert 0 < under < len(images)
    from service.settings import Settings

    settings = replace(Settings(model_dir=str(model_dir)), low_confidence=threshold)
    app = create_app(settings, classifier)
    before = value("cnn_low_confidence_total", MODEL_LABELS)
    answers = value("cnn_top1_probability_count", MODEL_LABELS)
    try:
        assert post_images(app.test_client(), images).status_code == 200
    finally:
        app.extensions["runner"].close(timeout=5)
    assert value("cnn_low_confidence_total", MODEL_LABELS) - before == under
    assert value("cnn_top1_probability_count", MODEL_LABELS) - answers == len(images)


def test_a_model_with_many_classes_keeps_its_most_frequent_classes_and_the_rest_as_other():
    import numpy as np

    from service.metrics import for_model

    classes = [f"c{i}" for i in range(200)]
    recorded = for_model("many", "1", classes, low_confidence=0.5, class_series=5)
    # A planted mix: class 10 + i answered 60 - 5i times for i < 10, and 150 classes once.
    tops = [10 + i for i in range(10) for _ in range(60 - 5 * i)] + list(range(50, 200))
    rng = np.random.default_rng(0)
    first = np.eye(len(classes))[rng.permutation(tops)]
    recorded.record_outputs(first)
    # Later answers of classes that did not make it go to "other", the kept ones their own.
    recorded.record_outputs(np.eye(len(classes))[[10, 10, 11, 19, 30, 199]])

    def count(label: str) -> float:
        labels = {"model": "many", "version": "1", "class": label}
        return REGISTRY.get_sample_value("cnn_predicted_class_total", labels) or 0.0

    kept = {f"c{10 + i}": 60 - 5 * i for i in range(5)}  # the five most frequent
    kept["c10"] += 2
    kept["c11"] += 1
    for label, expected in kept.items():
        assert count(label) == expected
    for label in ("c15", "c19", "c30", "c199"):
        assert (
            REGISTRY.get_sample_value(
                "cnn_predicted_class_total", {"model": "many", "version": "1", "class": label}
            )
            is None
        ), f"{label} has a series of its own"
    assert count("other") == len(tops) + 6 - sum(kept.values())
    exported = [
        sample
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == "cnn_predicted_class_total" and sample.labels["model"] == "many"
    ]
    assert len(exported) == 6  # five classes and "other"
