"""The HTTP API through Flask's test client, around the real small Keras model."""

from __future__ import annotations

import base64
import io
import time
from types import SimpleNamespace

import numpy as np
import pytest

from service.frontend.app import create_app
from service.frontend.http.predict import prediction_body
from service.settings import Settings
from tests.conftest import (
    LABELS,
    distinct_images,
    expected_device,
    expected_probabilities,
    image_bytes,
    make_cnn,
    write_model,
)
from tests.load import samples


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


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_holds_the_k_most_likely_labels_in_descending_order(client, cnn, classifier, k):
    data = image_bytes((36, 30), seed=7)
    response = client.post(f"/predict?top_k={k}", data=data, content_type="image/png")
    [prediction] = response.get_json()["predictions"]
    expected = expected_probabilities(cnn, data, classifier.info.spec).astype(float)
    assert len(set(expected.round(4))) == 3, "the test needs three distinct probabilities"
    ranked = sorted(zip(expected, LABELS, strict=True), reverse=True)[:k]
    assert [entry["label"] for entry in prediction["top"]] == [label for _, label in ranked]
    np.testing.assert_allclose(
        [entry["probability"] for entry in prediction["top"]], [p for p, _ in ranked], atol=1e-6
    )
    assert prediction["label"] == ranked[0][1]
    assert prediction["probability"] == pytest.approx(ranked[0][0], abs=1e-6)


def shaped(outputs: list[list[float]], top_k: int, labels=("cat", "dog", "owl", "yak")) -> dict:
    """Return prediction_body's answer for hand-made outputs of a stand-in model."""
    info = SimpleNamespace(labels=labels, name="pets", version="4")
    service = SimpleNamespace(info=info)
    return prediction_body(service, [np.array(o, dtype=np.float32) for o in outputs], top_k)


def test_prediction_body_ranks_hand_made_outputs():
    body = shaped([[0.1, 0.4, 0.2, 0.3], [0.7, 0.05, 0.05, 0.2]], top_k=3)
    assert body["model"] == {"name": "pets", "version": "4"}
    assert body["classes"] == ["cat", "dog", "owl", "yak"]
    first, second = body["predictions"]
    assert first["label"] == "dog"
    assert first["probability"] == pytest.approx(0.4)
    assert first["probabilities"] == pytest.approx([0.1, 0.4, 0.2, 0.3])
    assert [(t["label"], round(t["probability"], 6)) for t in first["top"]] == [
        ("dog", 0.4),
        ("yak", 0.3),
        ("owl", 0.2),
    ]
    assert second["label"] == "cat"
    assert [t["label"] for t in second["top"]] == ["cat", "yak", "dog"]


def test_prediction_body_breaks_ties_in_label_order():
    [prediction] = shaped([[0.3, 0.1, 0.3, 0.3]], top_k=4)["predictions"]
    assert [t["label"] for t in prediction["top"]] == ["cat", "owl", "yak", "dog"]
    assert prediction["label"] == "cat"


def test_prediction_body_breaks_ties_in_label_order_for_many_classes():
    # Over 16 values numpy's default sort is no longer an insertion sort, so not stable.
    labels = tuple(f"class-{i:02d}" for i in range(20))
    output = [0.08 if i % 3 == 0 else 0.02 for i in range(20)]
    [prediction] = shaped([output], top_k=20, labels=labels)["predictions"]
    high = [label for i, label in enumerate(labels) if i % 3 == 0]
    low = [label for i, label in enumerate(labels) if i % 3 != 0]
    assert [t["label"] for t in prediction["top"]] == high + low


def test_prediction_body_top_k_over_the_class_count_lists_every_class():
    [prediction] = shaped([[0.1, 0.2, 0.3, 0.4]], top_k=99)["predictions"]
    assert [t["label"] for t in prediction["top"]] == ["yak", "owl", "dog", "cat"]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def served_client(folder, model):
    """Write `model` to `folder`, load it as the service does, return an app and its client."""
    from service.runner.runtime import load_classifier

    write_model(folder, model, LABELS)
    classifier = load_classifier(folder, max_batch_size=2)
    app = create_app(Settings(model_dir=folder, max_batch_size=2), classifier)
    return app, app.test_client()


def ending_in(last: str):
    """Return a small CNN whose last layer is `last`: logits, or one of the softmax forms."""
    import keras

    if last == "logits":
        return make_cnn(softmax=False, seed=5)
    if last == "activation":
        return make_cnn(softmax=True, seed=5)
    keras.utils.set_random_seed(5)
    if last == "softmax-layer":
        layers = [keras.layers.Flatten(), keras.layers.Dense(3), keras.layers.Softmax()]
    else:
        layers = [keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    return keras.Sequential([keras.Input((32, 32, 3)), *layers])


def served_probabilities(folder, model, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Return what /predict serves for `data`, and the Keras model's own output on it."""
    app, client = served_client(folder, model)
    try:
        response = client.post("/predict", data=data, content_type="image/png")
        served = np.array(response.get_json()["predictions"][0]["probabilities"])
        spec = app.extensions["models"].find().info.spec
    finally:
        app.extensions["runner"].close(timeout=5)
    return served, expected_probabilities(model, data, spec)


@pytest.mark.parametrize("last", ["activation", "softmax-layer", "dense-softmax"])
def test_a_model_ending_in_softmax_is_served_unchanged(tmp_path, last):
    served, keras_output = served_probabilities(
        tmp_path / last, ending_in(last), image_bytes((32, 32), seed=11)
    )
    assert np.abs(softmax(keras_output) - keras_output).max() > 1e-3, "a second softmax shows"
    np.testing.assert_allclose(served, keras_output, atol=1e-6)


def test_a_logits_model_gets_exactly_one_softmax(tmp_path):
    served, logits = served_probabilities(
        tmp_path / "logits", ending_in("logits"), image_bytes((32, 32), seed=11)
    )
    once = softmax(logits.astype(np.float64))
    assert np.abs(logits.sum() - 1) > 1e-3, "raw logits are not probabilities"
    assert np.abs(softmax(once) - once).max() > 1e-3, "a second softmax shows"
    np.testing.assert_allclose(served, once, atol=1e-6)
    assert served.sum() == pytest.approx(1.0, abs=1e-5)


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
    [model] = ready.get_json()["models"]
    assert (model["name"], model["version"], model["state"]) == ("shapes", "2", "AVAILABLE")
    assert model["input_shape"] == [32, 32, 3]
    assert model["device"] == expected_device()


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
    # The worker is healthy: it is the runner that fails, and the master restarts runners.
    assert client.get("/healthz").status_code == 200
    assert_error(
        client.post("/predict", data=image_bytes(), content_type="image/png"), 503, "not_ready"
    )


def test_draining_reports_not_ready_but_still_answers(app, client):
    app.extensions["catalogue"].drain()
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
    labels = {"protocol": "http", "endpoint": "/predict", "status": "200"}
    latency = "cnn_http_request_duration_seconds_count"
    before = sum(samples(client.get("/metrics").get_data(as_text=True), latency, **labels))
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
        f'cnn_model_info{{device="{expected_device()}",input_shape="32x32x3",name="shapes",'
        'version="2"} 1.0',
    ):
        assert name in text
    assert sum(samples(text, latency, **labels)) == before + 1
