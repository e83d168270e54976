"""Faults in a real gunicorn: a failing forward pass, a dying inference thread, deadlines,
authentication and the separate metrics port."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.conftest import free_port, image_bytes
from tests.load import post_png

pytestmark = pytest.mark.slow

FAULT_APP = "tests.fault_app:create()"
BLACK = image_bytes((32, 32), color=(0, 0, 0))  # the fault app's forward pass raises
WHITE = image_bytes((32, 32), color=(255, 255, 255))  # the fault app's inference thread dies
GREY = image_bytes((32, 32), color=(128, 128, 128))  # the fault app's forward pass takes 2 s


def in_background(call, *args) -> dict:
    """Run call(*args) in a thread; the returned dict gets "result" when it is done."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=call(*args)))
    thread.start()
    box["thread"] = thread
    return box


def test_failing_forward_pass_fails_only_its_batch(server_factory, model_dir):
    server = server_factory(model_dir, app=FAULT_APP)
    failed = post_png(server.url, BLACK)
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "inference_failed"
    assert "Traceback" not in failed.text
    assert post_png(server.url, image_bytes()).status_code == 200
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    assert failed.headers["X-Request-ID"] in server.log(), "the 5xx is logged with its request id"


def test_dead_inference_thread_turns_not_ready_and_the_worker_is_replaced(
    server_factory, model_dir
):
    server = server_factory(model_dir, app=FAULT_APP, DRAIN_S="3")
    assert post_png(server.url, WHITE).status_code == 500
    readiness = requests.get(server.url + "/readyz", timeout=5)
    assert readiness.status_code == 503
    assert readiness.json()["status"] in ("batcher_stopped", "draining")
    assert post_png(server.url, image_bytes()).status_code == 503
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline, "no fresh worker became ready"
        try:
            if requests.get(server.url + "/readyz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    assert post_png(server.url, image_bytes()).status_code == 200
    assert "the inference thread died" in server.log()


def test_image_still_queued_at_its_deadline_gets_504(server_factory, model_dir):
    server = server_factory(model_dir, app=FAULT_APP)
    slow = in_background(post_png, server.url, GREY)
    time.sleep(0.5)  # the slow batch is running now
    started = time.monotonic()
    late = post_png(server.url, image_bytes(), "?timeout=0.5")
    waited = time.monotonic() - started
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "timeout"
    assert waited < 1.5, f"the 504 came after {waited:.2f}s, not at the 0.5 s deadline"
    slow["thread"].join(30)
    assert slow["result"].status_code == 200


def test_request_that_cannot_meet_its_deadline_is_refused_at_once(server_factory, model_dir):
    server = server_factory(model_dir, app=FAULT_APP)
    assert post_png(server.url, GREY).status_code == 200  # teaches the batcher: a batch ~2 s
    slow = in_background(post_png, server.url, GREY)
    time.sleep(0.3)
    queued = in_background(post_png, server.url, image_bytes(seed=5))
    time.sleep(0.3)
    started = time.monotonic()
    refused = post_png(server.url, image_bytes(seed=6), "", **{"X-Request-Timeout": "0.5"})
    assert time.monotonic() - started < 0.4, "refusal should not wait for the deadline"
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    estimate = requests.get(server.url + "/metrics", timeout=5).text
    assert "cnn_batch_queue_estimated_wait_seconds" in estimate
    for box in (slow, queued):
        box["thread"].join(30)
        assert box["result"].status_code == 200


def test_bearer_token_guards_predict_but_not_probes(server_factory, model_dir):
    token = "s3cret-token-value"
    server = server_factory(model_dir, API_TOKEN=token)
    missing = post_png(server.url, image_bytes())
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert post_png(server.url, image_bytes(), Authorization="Bearer wrong").status_code == 401
    assert post_png(server.url, image_bytes(), Authorization=f"Bearer {token}").status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(server.url + path, timeout=5).status_code == 200
    assert token not in server.log()


def test_metrics_can_live_on_their_own_port(server_factory, model_dir):
    metrics_port = free_port()
    server = server_factory(model_dir, WORKERS="2", METRICS_PORT=str(metrics_port))
    assert post_png(server.url, image_bytes()).status_code == 200
    separate = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    assert separate.status_code == 200
    assert "cnn_images_predicted_total 1.0" in separate.text
    assert requests.get(server.url + "/metrics", timeout=5).status_code == 404
