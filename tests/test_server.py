"""The real thing: cnn-serve under gunicorn on a loopback port, driven over HTTP."""

from __future__ import annotations

import base64
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import (
    LABELS,
    RUNNER_LABELS,
    distinct_images,
    expected_probabilities,
    image_bytes,
    run_python,
)
from tests.load import children, metric, post_png, runner_pids, worker_pids

pytestmark = pytest.mark.slow


def test_each_input_format_answers_the_models_own_output(
    server_factory, model_dir, cnn, classifier
):
    server = server_factory(model_dir)
    data = image_bytes((64, 48), seed=11)
    expected = expected_probabilities(cnn, data, classifier.info.spec)
    answers = [
        requests.post(server.url + "/predict", files={"image": ("a.png", data)}, timeout=30),
        post_png(server.url, data),
        requests.post(
            server.url + "/predict",
            json={"instances": [{"b64": base64.b64encode(data).decode()}]},
            timeout=30,
        ),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        assert response.headers["X-Request-ID"]
        body = response.json()
        assert body["classes"] == LABELS
        np.testing.assert_allclose(body["predictions"][0]["probabilities"], expected, atol=1e-5)


def test_errors_from_the_real_server_are_json(server_factory, model_dir):
    server = server_factory(model_dir, MAX_BODY_BYTES="2000")
    response = post_png(server.url, b"\0" * 10_000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    chunked = requests.post(
        server.url + "/predict",
        data=iter([b"\0" * 1000] * 10),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert chunked.status_code == 413
    assert post_png(server.url, b"not an image").json()["error"]["code"] == "invalid_image"
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200


def test_burst_of_64_distinct_images_each_gets_its_own_answer_in_batches(
    server_factory, model_dir, cnn, classifier
):
    server = server_factory(model_dir)
    images = distinct_images(64)
    expected = [expected_probabilities(cnn, d, classifier.info.spec) for d in images]
    barrier = threading.Barrier(64)

    def send(data: bytes) -> requests.Response:
        barrier.wait(10)
        return post_png(server.url, data)

    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(send, images))
    for response, want in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()["predictions"][0]["probabilities"]
        np.testing.assert_allclose(got, want, atol=1e-5)
    text = requests.get(server.url + "/metrics", timeout=5).text
    batches = metric(text, "cnn_batch_size_count", **RUNNER_LABELS)
    singles = metric(text, "cnn_batch_size_bucket", le="1.0", **RUNNER_LABELS)
    assert metric(text, "cnn_images_predicted_total", **RUNNER_LABELS) == 64
    assert batches < 64, "64 concurrent images ran in 64 forward passes: no batching"
    assert singles < batches, "no forward pass held more than one image"


def test_sigterm_during_a_burst_loses_no_accepted_request(server_factory, model_dir):
    server = server_factory(model_dir, DRAIN_S="2")
    images = distinct_images(48)
    barrier = threading.Barrier(len(images) + 1)

    def send(data: bytes) -> int:
        barrier.wait(10)
        return post_png(server.url, data).status_code

    with ThreadPoolExecutor(len(images)) as pool:
        statuses = [pool.submit(send, d) for d in images]
        barrier.wait(10)
        time.sleep(0.05)  # the burst is on the wire
        server.process.send_signal(15)
        time.sleep(0.3)
        readiness = requests.get(server.url + "/readyz", timeout=5)
        results = [s.result(60) for s in statuses]
    assert readiness.status_code == 503
    assert readiness.json()["status"] == "draining"
    assert results == [200] * len(images), f"lost: {len(images) - results.count(200)}"
    assert server.process.wait(30) == 0


def test_metrics_add_up_across_two_workers(server_factory, model_dir):
    server = server_factory(model_dir, WORKERS="2", THREADS="4")
    deadline = time.monotonic() + 60
    while metric(requests.get(server.url + "/metrics", timeout=5).text, "cnn_ready") < 2:
        assert time.monotonic() < deadline, "second worker never became ready"
        time.sleep(0.2)
    for data in distinct_images(20):
        assert post_png(server.url, data, Connection="close").status_code == 200
    scrapes = [requests.get(server.url + "/metrics", timeout=5).text for _ in range(4)]
    for text in scrapes:
        assert metric(text, "cnn_images_predicted_total", **RUNNER_LABELS) == 20
    assert "cnn_model_info{" in scrapes[0]


def test_health_endpoints_answer_curl_in_milliseconds(server_factory, model_dir):
    server = server_factory(model_dir)
    for path in ("/healthz", "/readyz"):
        started = time.monotonic()
        result = subprocess.run(
            ["curl", "-fsS", server.url + path], capture_output=True, timeout=10, check=False
        )
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("breaker", "expected"),
    [
        (lambda d: (d / "model.weights.h5").unlink(), "model.weights.h5: weights file is missing"),
        (lambda d: (d / "model.json").write_text("{"), "model.json: not valid JSON"),
        (lambda d: (d / "labels.json").write_text('["a"]'), "1 labels but the model outputs 3"),
        (
            lambda d: (d / "model.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64),
            "model.weights.h5: weights do not load",
        ),
    ],
    ids=["no-weights", "bad-json", "labels", "truncated-weights"],
)
# The runner's first start vets the model on the serving backend, before the port is bound.
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_bad_model_folder_stops_start_up_with_one_line_before_binding(
    tmp_path, cnn, breaker, expected, backend
):
    from tests.conftest import write_model

    folder = write_model(tmp_path / "m", cnn, LABELS)
    breaker(folder)
    with socket.socket() as holder:
        # Held for the whole run: had gunicorn tried to bind it, it would have logged
        # "Connection in use" lines, which the one-line check below would catch.
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service", "--model-dir", str(folder), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "KERAS_BACKEND": backend, "HOST": "127.0.0.1"},
        )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert lines[0].startswith("cnn-serve: error: ")


def _maps_matplotlib(pid: int) -> bool:
    """Tell whether process `pid` has any of matplotlib's files mapped (it imported it)."""
    return "matplotlib" in Path(f"/proc/{pid}/maps").read_text()


def test_the_launcher_and_workers_never_import_matplotlib(server_factory, model_dir, tmp_path):
    # Keras imports matplotlib at its own import when installed (about 0.5 s); it is, here.
    assert importlib.util.find_spec("matplotlib") is not None
    checked = run_python(
        [
            "-c",
            "import sys; from service.cli import main; "
            f"code = main(['--check', '--model-dir', {str(model_dir)!r}]); "
            "print(code, 'keras' in sys.modules, sys.modules.get('matplotlib') is not None)",
        ]
    )
    assert checked.stdout.splitlines()[-1].split() == ["0", "True", "False"], checked.stderr
    server = server_factory(model_dir)
    pids = [server.process.pid, *children(server.process.pid)]
    assert requests.post(server.url + "/predict", files={"image": image_bytes()}).ok
    assert [pid for pid in pids if _maps_matplotlib(pid)] == []


def test_on_jax_the_runner_alone_maps_jax_and_no_process_maps_tensorflow(
    server_factory, model_dir, cnn, classifier
):
    jax_server = server_factory(model_dir, KERAS_BACKEND="jax")
    master = jax_server.process.pid
    [runner] = runner_pids(master)
    for pid in [master, *worker_pids(master)]:
        assert "jaxlib" not in Path(f"/proc/{pid}/maps").read_text()
    runner_maps = Path(f"/proc/{runner}/maps").read_text()
    assert "jaxlib" in runner_maps and "tensorflow" not in runner_maps
    # The runner runs JAX's backend and answers as the model does.
    data = image_bytes()
    expected = expected_probabilities(cnn, data, classifier.info.spec)
    response = requests.post(jax_server.url + "/predict", files={"image": data}, timeout=30)
    assert response.status_code == 200, response.text
    got = response.json()["predictions"][0]["probabilities"]
    np.testing.assert_allclose(got, expected, atol=1e-5)
