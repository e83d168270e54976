"""The Open Inference Protocol (KServe V2) routes: Triton's own client against a real server,
and every error path through Flask's test client."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
import requests

from service.frontend.app import create_app
from service.settings import Settings
from tests.conftest import (
    LABELS,
    distinct_images,
    expected_device,
    expected_probabilities,
    start_server,
)

V2 = "/v2/models/shapes"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    """Start one real gunicorn server for the module's client tests."""
    started = start_server(model_dir, tmp_path_factory.mktemp("v2-server"))
    yield started
    started.stop()


@pytest.fixture
def triton(server):
    """Return a stock tritonclient HTTP client of the real server."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def pixels(count: int, seed: int = 0) -> np.ndarray:
    """Return random uint8 images at the model's input size."""
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def keras_output(cnn, batch: np.ndarray) -> np.ndarray:
    """Return the Keras model's own output on uint8 pixels scaled by 1/255 (no metadata)."""
    return np.asarray(cnn(batch.astype(np.float32) / 255.0, training=False))


# -- tritonclient against a real server ---------------------------------------------------


@pytest.mark.slow
def test_health_and_metadata_through_tritonclient(triton, classifier):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("shapes")
    assert triton.is_model_ready("shapes", "2")
    assert not triton.is_model_ready("shapes", "9")
    metadata = triton.get_model_metadata("shapes")
    assert metadata["name"] == "shapes"
    assert metadata["versions"] == ["2"]
    assert metadata["platform"] == "keras"
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, 32, 32, 3]},
    ]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata["parameters"] == {"labels": LABELS, "device": expected_device()}
    server = triton.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])


@pytest.mark.slow
def test_binary_bytes_images_answer_the_models_own_output(triton, cnn, classifier):
    import tritonclient.http as httpclient

    images = distinct_images(3)
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    output = httpclient.InferRequestedOutput("probabilities", binary_data=True)
    result = triton.infer("shapes", [tensor], outputs=[output], request_id="req-7")
    expected = [expected_probabilities(cnn, data, classifier.info.spec) for data in images]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert (response["model_name"], response["model_version"]) == ("shapes", "2")
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 3 * 3 * 4


@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_uint8_tensor_answers_the_models_own_output(triton, cnn, binary):
    import tritonclient.http as httpclient

    batch = pixels(2, seed=5)
    tensor = httpclient.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    output = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    result = triton.infer("shapes", [tensor], outputs=[output], model_version="2")
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, keras_output(cnn, batch), atol=1e-5)


@pytest.mark.slow
def test_class_count_gives_the_top_classes_most_likely_first(triton, cnn):
    import tritonclient.http as httpclient

    batch = pixels(2, seed=9)
    tensor = httpclient.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    output = httpclient.InferRequestedOutput("probabilities", class_count=3)
    got = triton.infer("shapes", [tensor], outputs=[output]).as_numpy("probabilities")
    assert got.shape == (2, 3)
    for row, expected in zip(got, keras_output(cnn, batch), strict=True):
        fields = [element.decode().split(":") for element in row]
        order = np.argsort(-expected, kind="stable")
        assert [int(index) for _, index, _ in fields] == list(order)
        assert [label for _, _, label in fields] == [LABELS[i] for i in order]
        np.testing.assert_allclose([float(v) for v, _, _ in fields], expected[order], atol=1e-5)


@pytest.mark.slow
def test_curl_style_json_request_without_binary(server, cnn):
    batch = pixels(1, seed=2)
    body = {
        "id": "42",
        "inputs": [
            {"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": batch.tolist()}
        ],
    }
    response = requests.post(server.url + V2 + "/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    answer = response.json()
    assert answer["id"] == "42"
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "FP32",
        [1, 3],
    )
    np.testing.assert_allclose(output["data"], keras_output(cnn, batch)[0], atol=1e-5)
    live = requests.get(server.url + "/v2/health/live", timeout=5)
    assert (live.status_code, live.json()) == (200, {"live": True})


# -- error paths through the test client ---------------------------------------------------


def assert_v2_error(response, status: int) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    assert body["error"]
    return body["error"]


def image_request(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """Return a binary BYTES request of `images`, as tritonclient builds it."""
    blob = b"".join(struct.pack("<I", len(data)) + data for data in images)
    size = {"binary_data_size": len(blob)}
    tensor = {"name": "image", "shape": [len(images)], "datatype": "BYTES", "parameters": size}
    header = orjson.dumps({"inputs": [tensor]})
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


def pixel_request(**changes: object) -> dict:
    tensor = {"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8"}
    tensor["data"] = pixels(1).ravel().tolist()
    return {"inputs": [{**tensor, **changes}]}


def test_unknown_model_and_version_are_404(client):
    assert "nope" in assert_v2_error(client.get("/v2/models/nope"), 404)
    assert_v2_error(client.get(V2 + "/versions/9"), 404)
    assert_v2_error(client.get("/v2/models/nope/ready"), 404)
    assert_v2_error(client.post("/v2/models/nope/infer", json=pixel_request()), 404)
    assert_v2_error(client.post(V2 + "/versions/9/infer", json=pixel_request()), 404)


@pytest.mark.parametrize(
    "changes",
    [
        {"datatype": "INT64"},
        {"datatype": "FP32", "name": "image"},
        {"shape": [1, 16, 16, 3]},
        {"shape": [1, 32, 32, 3, 1]},
        {"data": [1, 2, 3]},
        {"data": ["a"] * 3072},
        {"data": [300] * 3072},
        {"name": "other"},
    ],
    ids=["datatype", "image-fp32", "wrong-size", "rank", "count", "strings", "range", "name"],
)
def test_bad_tensors_are_400(client, changes):
    assert_v2_error(client.post(V2 + "/infer", json=pixel_request(**changes)), 400)


def test_unknown_output_and_bad_parameters_are_400(client):
    for outputs in ([{"name": "logits"}], [{"name": "probabilities", "parameters": 3}], "x"):
        request = {**pixel_request(), "outputs": outputs}
        assert_v2_error(client.post(V2 + "/infer", json=request), 400)
    request = {**pixel_request(), "parameters": {"binary_data_output": "yes"}}
    assert_v2_error(client.post(V2 + "/infer", json=request), 400)


def test_malformed_json_is_400(client):
    headers = {"Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b'{"inputs": []}'):
        assert_v2_error(client.post(V2 + "/infer", data=body, headers=headers), 400)


def test_bad_binary_framing_is_400(client):
    body, headers = image_request(distinct_images(1))
    for length in ("abc", str(len(body) + 1), "-1", "3"):
        response = client.post(
            V2 + "/infer", data=body, headers={"Inference-Header-Content-Length": length}
        )
        assert_v2_error(response, 400)
    assert_v2_error(client.post(V2 + "/infer", data=body + b"extra", headers=headers), 400)
    cut = body[: len(body) - 10]
    assert_v2_error(client.post(V2 + "/infer", data=cut, headers=headers), 400)


def test_undecodable_image_is_400(client):
    body, headers = image_request([distinct_images(1)[0], b"not an image"])
    assert "image 2" in assert_v2_error(client.post(V2 + "/infer", data=body, headers=headers), 400)


def test_binary_bytes_images_answer_in_json_when_asked(client, cnn, classifier):
    images = distinct_images(2)
    body, headers = image_request(images)
    response = client.post(V2 + "/infer", data=body, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "Inference-Header-Content-Length" not in response.headers
    data = response.get_json()["outputs"][0]["data"]
    expected = [expected_probabilities(cnn, image, classifier.info.spec) for image in images]
    np.testing.assert_allclose(np.reshape(data, (2, 3)), expected, atol=1e-5)


def test_unsupported_content_type_and_encoding_are_415(client):
    response = client.post(V2 + "/infer", data=b"{}", headers={"Content-Type": "text/plain"})
    assert_v2_error(response, 415)
    gzipped = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    assert_v2_error(client.post(V2 + "/infer", data=b"\x1f\x8b", headers=gzipped), 415)


@pytest.fixture
def small_app(model_dir, classifier):
    """Return an app that takes two images and 20 kB a request."""
    settings = Settings(
        model_dir=model_dir,
        max_batch_size=16,
        max_queue=64,
        max_images_per_request=2,
        max_body_bytes=20_000,
    )
    app = create_app(settings, classifier)
    yield app
    app.extensions["runner"].close(timeout=5)


def test_too_many_images_and_too_large_a_body_are_413(small_app):
    client = small_app.test_client()
    body, headers = image_request(distinct_images(3))
    assert "limit is 2" in assert_v2_error(
        client.post(V2 + "/infer", data=body, headers=headers), 413
    )
    big = {"inputs": [], "padding": "x" * 30_000}
    assert_v2_error(client.post(V2 + "/infer", json=big), 413)


def test_stopped_model_is_503_with_retry_after(app, client):
    app.extensions["runner"].close(timeout=5)
    response = client.post(V2 + "/infer", json=pixel_request())
    assert_v2_error(response, 503)
    assert response.headers["Retry-After"]
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get(V2 + "/ready").status_code == 503


def test_predict_errors_keep_their_own_shape(client):
    response = client.post("/predict", data=b"x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_media_type"


def test_unexpected_failure_is_500_in_the_v2_shape(app, client, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.extensions["models"].find(), "predict_tensor", fail)
    message = assert_v2_error(client.post(V2 + "/infer", json=pixel_request()), 500)
    assert "boom" not in message


def test_routing_errors_under_v2_are_in_the_v2_shape(client):
    # Raised by Flask's routing, before any V2 handler is chosen.
    assert_v2_error(client.get("/v2/models/shapes/nothing"), 404)
    response = client.get(V2 + "/infer")
    assert_v2_error(response, 405)
    assert set(response.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}
