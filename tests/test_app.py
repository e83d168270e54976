"""The app's wiring around the real model: the request deadline, the error table's statuses and
headers, authentication, and readiness, through Flask's test client."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.frontend.app import create_app
from service.settings import Settings
from tests.conftest import image_bytes, make_cnn, write_model
from tests.fault_app import WrappedClassifier

GREY = image_bytes((32, 32), color=(128, 128, 128))


class HeldClassifier(WrappedClassifier):
    """The real classifier, but a batch holding a flat mid-grey image waits for `release`."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.held = threading.Event()
        self.release = threading.Event()

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray:
        if 128 in self.flat_values(inputs):
            self.held.set()
            self.release.wait(60)
        return self.inner.predict_batch(inputs)


def post(client, data: bytes, query: str = "", **headers: str):
    return client.post(f"/predict{query}", data=data, content_type="image/png", headers=headers)


@pytest.fixture
def held(model_dir, classifier):
    """Return a function building a test client around a HeldClassifier, with settings."""
    built = []

    def build(**settings):
        model = HeldClassifier(classifier)
        app = create_app(Settings(model_dir=model_dir, **settings), model)
        built.append((app, model))
        return app.test_client(), model

    yield build
    for app, model in built:
        model.release.set()
        app.extensions["runner"].close(timeout=30)


def hold_one_batch(client, model: HeldClassifier, pool: ThreadPoolExecutor):
    """Send a request whose batch is held; return its future once the batch has started."""
    future = pool.submit(post, client, GREY)
    assert model.held.wait(30)
    return future


@pytest.mark.parametrize("query", ["?timeout=100", ""])
def test_deadline_is_capped_by_the_request_timeout_setting(held, query):
    client, model = held(request_timeout_s=0.5)
    with ThreadPoolExecutor(1) as pool:
        first = hold_one_batch(client, model, pool)
        # Queued behind the held batch: its deadline is the setting's 0.5 s, not 100 s.
        late = post(client, image_bytes(), query)
        assert late.status_code == 504
        assert late.get_json()["error"]["code"] == "timeout"
        model.release.set()
        assert first.result(30).status_code in (200, 504)  # answered either way


@pytest.mark.parametrize(
    ("query", "headers"),
    [("?timeout=0.2", {}), ("", {"X-Request-Timeout": "0.2"})],
    ids=["query", "header"],
)
def test_client_may_ask_for_a_shorter_deadline(held, query, headers):
    client, model = held(request_timeout_s=60)
    with ThreadPoolExecutor(1) as pool:
        first = hold_one_batch(client, model, pool)
        late = post(client, image_bytes(), query, **headers)
        assert late.status_code == 504, "the 0.2 s deadline passed while the batch was held"
        model.release.set()
        assert first.result(30).status_code == 200


@pytest.mark.parametrize("timeout", ["abc", "0", "-1", "inf", "nan"])
def test_bad_timeout_is_a_400(client, timeout):
    response = post(client, image_bytes(), f"?timeout={timeout}")
    assert response.status_code == 400
    assert "timeout" in response.get_json()["error"]["message"]


def test_full_queue_is_a_503_with_retry_after(held):
    client, model = held(max_queue=2, max_images_per_request=2, max_batch_size=1)
    with ThreadPoolExecutor(2) as pool:
        first = hold_one_batch(client, model, pool)
        queued = pool.submit(post, client, image_bytes(seed=1))
        service = client.application.extensions["runner"].models.find()
        assert service.batcher.wait_queued(1, timeout=30)
        files = {"image": [(io.BytesIO(image_bytes(seed=i)), f"{i}.png") for i in (2, 3)]}
        shed = client.post("/predict", data=files)
        assert shed.status_code == 503
        assert shed.get_json()["error"]["code"] == "overloaded"
        assert int(shed.headers["Retry-After"]) >= 1
        model.release.set()
        assert first.result(30).status_code == 200
        assert queued.result(30).status_code == 200


def test_predict_says_in_server_timing_how_long_its_model_took(held):
    client, model = held()
    with ThreadPoolExecutor(1) as pool:
        answer = hold_one_batch(client, model, pool)
        time.sleep(0.3)  # the batch is held this long, at the least
        model.release.set()
        response = answer.result(30)
    assert response.status_code == 200
    parts = [part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(",")]
    timing = {name: float(ms) for name, ms in parts}
    assert list(timing) == ["read", "model", "total"]
    assert timing["model"] >= 300
    assert timing["read"] + timing["model"] <= timing["total"] < 30_000


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret-and-more"],
    ids=["none", "wrong", "other-scheme", "no-scheme", "longer"],
)
def test_predict_needs_the_exact_bearer_token(model_dir, classifier, authorization):
    settings = Settings(model_dir=model_dir, api_token="s3cret")
    client = create_app(settings, classifier).test_client()
    headers = {"Authorization": authorization} if authorization else {}
    refused = post(client, image_bytes(), **headers)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert post(client, image_bytes(), Authorization="Bearer s3cret").status_code == 200
    assert post(client, image_bytes(), Authorization="bearer  s3cret").status_code == 200


def test_top_k_defaults_to_five(tmp_path):
    from service.runner.runtime import load_classifier

    labels = [f"class {i}" for i in range(7)]
    folder = write_model(tmp_path / "seven", make_cnn(classes=7), labels)
    client = create_app(Settings(model_dir=folder), load_classifier(folder, 4)).test_client()
    [prediction] = post(client, image_bytes()).get_json()["predictions"]
    assert len(prediction["top"]) == 5
    assert len(prediction["probabilities"]) == 7


def test_draining_sets_the_ready_gauge_to_zero(app, client):
    assert REGISTRY.get_sample_value("cnn_ready") == 1
    app.extensions["catalogue"].drain()
    assert REGISTRY.get_sample_value("cnn_ready") == 0


def test_a_dead_inference_thread_is_reported_as_batcher_stopped(model_dir, classifier):
    class Dying(HeldClassifier):
        def predict_batch(self, inputs: np.ndarray) -> np.ndarray:
            raise SystemExit("the inference thread dies")

    client = create_app(Settings(model_dir=model_dir), Dying(classifier)).test_client()
    assert post(client, image_bytes()).status_code == 500
    service = client.application.extensions["runner"].models.find()
    assert service.batcher.wait_stopped(30)
    readiness = client.get("/readyz")
    assert readiness.status_code == 503
    assert readiness.get_json()["status"] == "batcher_stopped"
    # The worker is healthy: it is the runner that broke, and the master restarts runners.
    assert client.get("/healthz").status_code == 200
