"""TF Serving's REST API: a real gunicorn through plain HTTP, and the error paths in Flask."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest
import requests

from service.frontend.app import create_app
from service.settings import Settings
from tests.conftest import LABELS, distinct_images, expected_probabilities, start_server

MODEL = "/v1/models/shapes"
FORM = "application/x-www-form-urlencoded"


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def model_tensor(count: int, seed: int = 0) -> np.ndarray:
    """Return float32 model inputs [N, 32, 32, 3] in [0, 1), made here, not by the service."""
    return np.random.default_rng(seed).random((count, 32, 32, 3), dtype=np.float32)


def assert_error(response, status: int) -> str:
    over_http = isinstance(response, requests.Response)
    document = response.json() if over_http else response.get_json()
    assert response.status_code == status, document
    assert list(document) == ["error"] and isinstance(document["error"], str)
    assert document["error"] and "Traceback" not in document["error"]
    return document["error"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Start one real gunicorn for this module's HTTP tests."""
    running = start_server(model_dir, tmp_path_factory.mktemp("tfserving"))
    yield running
    running.stop()


@pytest.mark.slow
@pytest.mark.parametrize("path", [MODEL, MODEL + "/versions/2"])
def test_status_says_the_served_version_is_available(server, path):
    response = requests.get(server.url + path, timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "model_version_status": [
            {
                "version": "2",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


@pytest.mark.slow
@pytest.mark.parametrize("path", [MODEL + "/metadata", MODEL + "/versions/2/metadata"])
def test_metadata_gives_the_signature_shapes_and_dtypes(server, path):
    document = requests.get(server.url + path, timeout=10).json()
    assert document["model_spec"] == {"name": "shapes", "signature_name": "", "version": "2"}
    signature = document["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"

    def shape(tensor: dict) -> list[int]:
        assert tensor["tensor_shape"]["unknown_rank"] is False
        return [int(dim["size"]) for dim in tensor["tensor_shape"]["dim"]]

    inputs, outputs = signature["inputs"], signature["outputs"]
    assert inputs["image_bytes"]["dtype"] == "DT_STRING"
    assert shape(inputs["image_bytes"]) == [-1]
    assert inputs["image"]["dtype"] == "DT_FLOAT"
    assert shape(inputs["image"]) == [-1, 32, 32, 3]
    assert outputs["probabilities"]["dtype"] == "DT_FLOAT"
    assert shape(outputs["probabilities"]) == [-1, len(LABELS)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_body", "key"),
    [
        (lambda images: {"instances": images}, "predictions"),
        (lambda images: {"instances": [{"image_bytes": i} for i in images]}, "predictions"),
        (lambda images: {"inputs": images}, "outputs"),
        (lambda images: {"inputs": {"image_bytes": images}}, "outputs"),
    ],
    ids=["row", "row-named", "columnar", "columnar-named"],
)
def test_predict_b64_images_matches_the_model(server, cnn, classifier, make_body, key):
    images = distinct_images(3)
    body = {"signature_name": "serving_default", **make_body([b64(i) for i in images])}
    response = requests.post(server.url + MODEL + ":predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert list(answer) == [key]
    expected = [expected_probabilities(cnn, i, classifier.info.spec) for i in images]
    np.testing.assert_allclose(answer[key], expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_body", "key"),
    [
        (lambda batch: {"instances": batch}, "predictions"),
        (lambda batch: {"inputs": {"image": batch}}, "outputs"),
    ],
    ids=["row", "columnar-named"],
)
def test_predict_nested_list_tensor_matches_the_model(server, cnn, make_body, key):
    batch = model_tensor(2)
    url = server.url + MODEL + "/versions/2:predict"
    response = requests.post(url, json=make_body(batch.tolist()), timeout=30)
    assert response.status_code == 200, response.text
    expected = np.asarray(cnn(batch, training=False))
    np.testing.assert_allclose(response.json()[key], expected, atol=1e-5)


@pytest.mark.slow
def test_classify_lists_labels_most_likely_first(server, cnn, classifier):
    # Images whose classes the model does not rank in label order, so that a :classify
    # listing them in label order fails here.
    candidates = distinct_images(40)
    spec = classifier.info.spec
    images = [
        data
        for data in candidates
        if list(np.argsort(-expected_probabilities(cnn, data, spec))) != [0, 1, 2]
    ][:2]
    assert len(images) == 2, "no image ranks its classes out of label order"
    body = {"examples": [{"image": b64(i)} for i in images]}
    response = requests.post(server.url + MODEL + ":classify", json=body, timeout=30)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert len(result) == len(images)
    for pairs, data in zip(result, images, strict=True):
        expected = expected_probabilities(cnn, data, classifier.info.spec)
        assert [label for label, _ in pairs] == [LABELS[k] for k in np.argsort(-expected)]
        assert [score for _, score in pairs] == sorted((s for _, s in pairs), reverse=True)
        np.testing.assert_allclose(
            [score for _, score in pairs], np.sort(expected)[::-1], atol=1e-5
        )


@pytest.mark.slow
def test_errors_over_http_are_tf_serving_shaped(server):
    assert_error(requests.get(server.url + "/v1/models/nope", timeout=10), 404)
    response = requests.get(server.url + MODEL + ":predict", timeout=10)
    assert_error(response, 405)
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("get", "/v1/models/nope", 404),
        ("get", "/v1/models/nope/metadata", 404),
        ("get", MODEL + "/versions/1", 404),
        ("post", MODEL + "/versions/7:predict", 404),
        ("get", MODEL + "/labels/stable", 404),
        ("get", MODEL + "/versions", 404),
        ("post", MODEL + ":regress", 404),
        ("get", MODEL + ":predict", 405),
        ("post", MODEL, 405),
        ("put", MODEL + "/metadata", 405),
    ],
)
def test_routing_errors_are_tf_serving_shaped(client, method, path, status):
    assert_error(getattr(client, method)(path, json={}), status)


def test_wrong_method_names_the_allowed_one(client):
    assert client.post(MODEL + "/metadata").headers["Allow"] == "GET, HEAD"
    assert client.delete(MODEL + ":classify").headers["Allow"] == "POST"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"instances": [b64(b"x")], "inputs": [b64(b"x")]}, "exactly one"),
        ({}, "exactly one"),
        ({"instances": [{"b64": "not base64!"}]}, "not valid base64"),
        ({"instances": [b64(b"not an image")]}, "instances[0]"),
        ({"instances": model_tensor(1)[:, :16].tolist()}, "shape"),
        ({"instances": [[[1, 2]], [[3]]]}, "nested list"),
        ({"instances": ["abc"]}, "nested list"),
        ({"instances": []}, "no image"),
        ({"instances": {"b64": "eA=="}}, "must be a list"),
        ({"inputs": {"pixels": []}}, "name one input"),
        ({"instances": [b64(b"x")], "signature_name": "other"}, "signature"),
        ([1, 2], "object"),
    ],
)
def test_bad_predict_requests_are_400(client, body, fragment):
    assert fragment in assert_error(client.post(MODEL + ":predict", json=body), 400)


def test_malformed_json_is_400(client):
    response = client.post(MODEL + ":predict", data=b"{nope", content_type="application/json")
    assert "JSON" in assert_error(response, 400)


@pytest.mark.parametrize(
    "body", [{"examples": "x"}, {"examples": [{"caption": "sea"}]}, {"examples": [{"image": 1}]}]
)
def test_bad_classify_requests_are_400(client, body):
    assert_error(client.post(MODEL + ":classify", json=body), 400)


def test_too_many_images_is_413(app, client):
    limit = app.config["SETTINGS"].max_images_per_request
    body = {"instances": [b64(b"x")] * (limit + 1)}
    assert "limit" in assert_error(client.post(MODEL + ":predict", json=body), 413)


def test_body_over_the_limit_is_413(model_dir, classifier):
    client = create_app(
        Settings(model_dir=model_dir, max_body_bytes=1000), classifier
    ).test_client()
    body = {"instances": [b64(b"\0" * 5000)]}
    assert "1000 bytes" in assert_error(client.post(MODEL + ":predict", json=body), 413)


def test_missing_token_is_401(model_dir, classifier):
    settings = Settings(model_dir=model_dir, api_token="secret")
    client = create_app(settings, classifier).test_client()
    assert_error(client.get(MODEL), 401)
    assert client.get(MODEL, headers={"Authorization": "Bearer secret"}).status_code == 200


def test_draining_reports_unloading_and_still_answers(app, client):
    app.extensions["catalogue"].drain()
    status = client.get(MODEL).get_json()["model_version_status"][0]
    assert status["state"] == "UNLOADING"
    body = {"instances": model_tensor(1).tolist()}
    assert client.post(MODEL + ":predict", json=body).status_code == 200


def test_not_loaded_is_503_with_retry_after(tmp_path):
    client = create_app(Settings(model_dir=tmp_path / "missing")).test_client()
    response = client.get(MODEL)
    assert_error(response, 503)
    assert response.headers["Retry-After"] == "1"


def test_predict_keeps_its_own_error_shape(client):
    error = client.post("/predict", json={"instances": []}).get_json()["error"]
    assert error["code"] == "invalid_request"


def test_curl_default_content_type_is_read_as_json(client):
    # curl -d sends application/x-www-form-urlencoded; TF Serving reads the body as JSON.
    body = orjson.dumps({"instances": model_tensor(1).tolist()})
    response = client.post(MODEL + ":predict", data=body, content_type=FORM)
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["predictions"]) == 1


def test_unexpected_failure_is_500_in_the_tf_serving_shape(app, client, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.extensions["models"].find(), "predict_tensor", fail)
    body = {"instances": model_tensor(1).tolist()}
    message = assert_error(client.post(MODEL + ":predict", json=body), 500)
    assert "boom" not in message
    assert "request id" in message


def test_routing_errors_under_v1_are_in_the_tf_serving_shape(client):
    assert_error(client.get("/v1/nothing"), 404)
    # /predict keeps its own shape: the path says which protocol answers.
    assert client.get("/predict").get_json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "method", "endpoint"),
    [
        (MODEL, "get", "/v1/models/<name>"),
        (MODEL + "/versions/2/metadata", "get", "/v1/models/<name>/versions/<version>/metadata"),
        (MODEL + ":predict", "post", "/v1/models/<name>:predict"),
        (MODEL + "/versions/2:classify", "post", "/v1/models/<name>/versions/<version>:classify"),
    ],
)
def test_request_metrics_name_the_tf_serving_route(client, monkeypatch, path, method, endpoint):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # the in-process registry
    from prometheus_client import REGISTRY

    labels = {"protocol": "http", "endpoint": endpoint, "status": "200"}
    name = "cnn_http_request_duration_seconds_count"
    before = REGISTRY.get_sample_value(name, labels) or 0.0
    body = {"instances": [b64(distinct_images(1)[0])]}
    if path.endswith(":classify"):
        body = {"examples": [{"image": b64(distinct_images(1)[0])}]}
    response = getattr(client, method)(path, **({"json": body} if method == "post" else {}))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert REGISTRY.get_sample_value(name, labels) == before + 1
