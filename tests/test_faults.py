"""Faults in a real gunicorn: a failing forward pass, a dying inference thread, deadlines,
authentication and the separate metrics port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.conftest import RUNNER_LABELS, free_port, image_bytes
from tests.load import metric, post_png, wait_for_metric

pytestmark = pytest.mark.slow

BLACK = image_bytes((32, 32), color=(0, 0, 0))  # the fault app's forward pass raises
WHITE = image_bytes((32, 32), color=(255, 255, 255))  # the fault app's inference thread dies
GREY = image_bytes((32, 32), color=(128, 128, 128))  # the fault app holds the forward pass


def in_background(call, *args) -> dict:
    """Run call(*args) in a thread; the returned dict gets "result" when it is done."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=call(*args)))
    thread.start()
    box["thread"] = thread
    return box


def result_of(box: dict, within_s: float = 60):
    """Return the result of an in_background call, waiting for it."""
    box["thread"].join(within_s)
    assert "result" in box, "the background request did not finish"
    return box["result"]


def test_failing_forward_pass_fails_only_its_batch(fault_server):
    server, _ = fault_server()
    failed = post_png(server.url, BLACK)
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "inference_failed"
    assert "Traceback" not in failed.text
    assert post_png(server.url, image_bytes()).status_code == 200
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    assert failed.headers["X-Request-ID"] in server.log(), "the 5xx is logged with its request id"


def test_dead_inference_thread_turns_not_ready_and_the_worker_is_replaced(fault_server):
    server, _ = fault_server(DRAIN_S="3")
    assert post_png(server.url, WHITE).status_code == 500
    readiness = requests.get(server.url + "/readyz", timeout=5)
    assert readiness.status_code == 503
    assert readiness.json()["status"] in ("batcher_stopped", "draining")
    assert post_png(server.url, image_bytes()).status_code == 503
    deadline = time.monotonic() + 120
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


def test_image_still_queued_at_its_deadline_gets_504(fault_server):
    server, control = fault_server()
    held = in_background(post_png, server.url, GREY)
    control.wait_held(1)
    late = post_png(server.url, image_bytes(), "?timeout=0.5")
    # The batch ahead is still held: the 504 came at the deadline, not after that batch.
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "timeout"
    control.release(1)
    assert result_of(held).status_code == 200


def test_request_whose_batch_runs_past_its_deadline_still_gets_its_answer(fault_server):
    # The batch holding the request starts before its deadline and ends after it: the worker
    # waits the running batch's grace (REQUEST_TIMEOUT_S again) and answers 200.
    server, control = fault_server(REQUEST_TIMEOUT_S="3")
    sent = time.monotonic()
    held = in_background(post_png, server.url, GREY)
    control.wait_held(1)
    time.sleep(max(0.0, sent + 4 - time.monotonic()))  # a second past the deadline
    assert "result" not in held
    control.release(1)
    response = result_of(held)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


def test_request_that_cannot_meet_its_deadline_is_refused_at_once(fault_server):
    server, control = fault_server()
    teacher = in_background(post_png, server.url, GREY)
    control.wait_held(1)
    time.sleep(1.0)  # so the batcher learns that a forward pass takes at least 1 s
    control.release(1)
    assert result_of(teacher).status_code == 200
    held = in_background(post_png, server.url, GREY)
    control.wait_held(2)
    queued = in_background(post_png, server.url, image_bytes(seed=5))
    wait_for_metric(server.url, "cnn_batch_queue_depth", 1, **RUNNER_LABELS)
    # Estimated wait: one more batch of >= 1 s, past this request's 0.5 s deadline.
    refused = post_png(server.url, image_bytes(seed=6), "", **{"X-Request-Timeout": "0.5"})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    control.release(2)
    for box in (held, queued):
        assert result_of(box).status_code == 200


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


def test_token_file_guards_predict_through_a_real_server(server_factory, model_dir, tmp_path):
    token = "from-a-mounted-secret"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")  # as a Kubernetes secret file may end
    server = server_factory(model_dir, API_TOKEN_FILE=str(token_file), API_TOKEN="ignored")
    assert post_png(server.url, image_bytes()).status_code == 401
    assert post_png(server.url, image_bytes(), Authorization="Bearer ignored").status_code == 401
    assert post_png(server.url, image_bytes(), Authorization=f"Bearer {token}").status_code == 200
    assert token not in server.log()


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot be read (No such file or directory)"), ("\n", "the file is empty")],
    ids=["missing", "empty"],
)
def test_bad_token_file_stops_start_up_with_one_line_before_binding(
    model_dir, tmp_path, content, expected
):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    port = free_port()
    environment = {**os.environ, "API_TOKEN_FILE": str(token_file), "PORT": str(port)}
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir)]
    result = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [f"cnn-serve: error: API_TOKEN_FILE {token_file}: {expected}"], result.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the port was bound"


def test_metrics_can_live_on_their_own_port(server_factory, model_dir):
    metrics_port = free_port()
    server = server_factory(model_dir, WORKERS="2", METRICS_PORT=str(metrics_port))
    assert post_png(server.url, image_bytes()).status_code == 200
    separate = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    assert separate.status_code == 200
    assert metric(separate.text, "cnn_images_predicted_total", **RUNNER_LABELS) == 1
    assert requests.get(server.url + "/metrics", timeout=5).status_code == 404
