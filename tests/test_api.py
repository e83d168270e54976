"""The HTTP API through Flask's test client, around the real small Keras model."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest

from service.app import create_app
from service.settings import Settings
from tests.conftest import LABELS, distinct_images, expected_probabilities, image_bytes


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert "Traceback" not in error["message"]
    return error


def test_multipart_prediction_matches_the_model(client, cnn, classifier):
    data = image_bytes((45, 31), seed=3)
    response = client.post("/predict", data={"image": (io.BytesIO(data), "cat.png")})
    assert response.status_code == 200
    body = response.get_json()
    assert body["model"] == {"name": "shapes", "version": "2"}
    assert body["classes"] == LABELS
    [prediction] = body["predictions"]
    expected = expected_probabilities(cnn, data, classifier.info.spec)
    np.testing.assert_allclose(prediction["probabilities"], expected, atol=1e-5)
    assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    best = int(np.argmax(expected))
    assert prediction["label"] == LABELS[best]
    assert prediction["probability"] == pytest.approx(expected[best], abs=1e-5)
    assert [t["label"] for t in prediction["top"]] == [LABELS[i] for i in np.argsort(-expected)]


def test_raw_image_body_and_b64_json_give_the_same_answer(client):
    data = image_bytes((32, 32), fmt="JPEG", seed=4)
    raw = client.post("/predict", data=data, content_type="image/jpeg").get_json()
    payload = {"instances": [{"b64": base64.b64encode(data).decode()}]}
    as_json = client.post("/predict", json=payload).get_json()
    assert raw["predictions"] == as_json["predictions"]


def test_several_images_answer_in_request_order(client, cnn, classifier):
    images = distinct_images(5)
    files = [(io.BytesIO(d), f"{i}.png") for i, d in enumerate(images)]
    response = client.post("/predict", data={"image": files})
    predictions = response.get_json()["predictions"]
    assert len(predictions) == 5
    for data, prediction in zip(images, predictions, strict=True):
        expected = expected_probabilities(cnn, data, classifier.info.spec)
        np.testing.assert_allclose(prediction["probabilities"], expected, atol=1e-5)


@pytest.mark.parametrize(("top_k", "count"), [("1", 1), ("2", 2), ("1000000000", 3)])
def test_top_k_limits_the_top_list(client, top_k, count):
    response = client.post(f"/predict?top_k={top_k}", data=image_bytes(), content_type="image/png")
    assert len(response.get_json()["predictions"][0]["top"]) == count


@pytest.mark.parametrize("top_k", ["0", "-1", "abc", "1.5"])
def test_bad_top_k_is_a_400(client, top_k):
    response = client.post(f"/predict?top_k={top_k}", data=image_bytes(), content_type="image/png")
    assert "top_k" in assert_error(response, 400, "invalid_request")["message"]


def test_unknown_query_parameter_is_a_400(client):
    response = client.post("/predict?topk=3", data=image_bytes(), content_type="image/png")
    assert "topk" in assert_error(response, 400, "invalid_request")["message"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"", None, 400, "invalid_request"),
        (b"", "image/png", 400, "invalid_image"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"not json", "application/json", 400, "invalid_request"),
        (b"[1, 2]", "application/json", 400, "invalid_request"),
        (b'{"instances": {"b64": "x"}}', "application/json", 400, "invalid_request"),
        (b'{"instances": [{"b64": "@@@"}]}', "application/json", 400, "invalid_request"),
        (b'{"instances": ["abc"]}', "application/json", 400, "invalid_request"),
        (b"%PDF-1.4 fake", "image/jpeg", 400, "invalid_image"),
    ],
    ids=[
        "empty", "empty-image", "text", "bad-json", "json-list", "instances-not-list",
        "bad-base64", "instance-not-object", "pdf-as-jpeg",
    ],
)  # fmt: skip
def test_bad_requests_get_json_errors(client, body, content_type, status, code):
    assert_error(client.post("/predict", data=body, content_type=content_type), status, code)


def test_error_message_names_the_bad_image(client):
    files = [(io.BytesIO(image_bytes()), "good.png"), (io.BytesIO(b"junk"), "bad.png")]
    error = assert_error(client.post("/predict", data={"image": files}), 400, "invalid_image")
    assert error["message"].startswith("image 2")


def test_multipart_without_a_file_part_is_a_400(client):
    response = client.post("/predict", data={"note": "no file"}, content_type="multipart/form-data")
    assert_error(response, 400, "invalid_request")


def test_too_many_images_is_a_413(app, client):
    limit = app.config["SETTINGS"].max_images_per_request
    payload = {"instances": [{"b64": base64.b64encode(image_bytes()).decode()}] * (limit + 1)}
    assert_error(client.post("/predict", json=payload), 413, "payload_too_large")


def test_body_over_the_limit_is_a_413(model_dir, classifier):
    settings = Settings(model_dir=model_dir, max_body_bytes=1000)
    client = create_app(settings, classifier).test_client()
    response = client.post("/predict", data=b"\0" * 5000, content_type="image/png")
    assert_error(response, 413, "payload_too_large")


def test_too_many_pixels_is_a_413(model_dir, classifier):
    client = create_app(
        Settings(model_dir=model_dir, max_image_pixels=100), classifier
    ).test_client()
    response = client.post("/predict", data=image_bytes((20, 20)), content_type="image/png")
    assert_error(response, 413, "payload_too_large")


def test_unknown_path_and_wrong_method_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    response = client.get("/predict")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_health_ready_and_model_facts(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    model = ready.get_json()["model"]
    assert model["input_shape"] == [32, 32, 3]
    assert model["device"].endswith("CPU:0")


def test_not_ready_until_the_model_has_loaded(tmp_path):
    settings = Settings(model_dir=tmp_path / "missing")
    client = create_app(settings).test_client()
    deadline = time.monotonic() + 30
    while client.get("/readyz").get_json()["status"] == "starting":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "model folder does not exist" in ready.get_json()["error"]
    assert client.get("/healthz").status_code == 503
    assert_error(
        client.post("/predict", data=image_bytes(), content_type="image/png"), 503, "not_ready"
    )


def test_draining_reports_not_ready_but_still_answers(app, client):
    app.extensions["model_service"].drain()
    assert client.get("/readyz").status_code == 503
    assert client.get("/readyz").get_json()["status"] == "draining"
    assert client.post("/predict", data=image_bytes(), content_type="image/png").status_code == 200


def test_request_id_is_echoed_or_made(client):
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
        == "abc-123"
    )
    made = client.get("/healthz", headers={"X-Request-ID": "bad id <script>"}).headers[
        "X-Request-ID"
    ]
    assert made.isalnum() and len(made) >= 16
    assert client.get("/healthz").headers["X-Request-ID"] != made


def test_metrics_exposition_counts_predictions(client):
    client.post("/predict", data=image_bytes(), content_type="image/png")
    text = client.get("/metrics").get_data(as_text=True)
    for name in (
        "cnn_http_request_duration_seconds_bucket",
        "cnn_batch_queue_wait_seconds_bucket",
        "cnn_inference_duration_seconds_bucket",
        "cnn_preprocess_duration_seconds_bucket",
        "cnn_batch_size_bucket",
        "cnn_images_predicted_total",
        "cnn_batch_queue_depth",
        'cnn_model_info{device="CPU:0",input_shape="32x32x3",name="shapes",version="2"} 1.0',
    ):
        assert name in text
    assert 'endpoint="/predict",status="200"' in text
