"""The metrics as Prometheus itself reads them: promtool's linter and a real scraping server."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import requests

from tests.conftest import MODEL_LABELS, distinct_images, free_port, require_tool
from tests.load import post_png

pytestmark = pytest.mark.slow


def require(tool: str) -> str:
    return require_tool(tool, "Debian package 'prometheus'")


def query(api: str, promql: str) -> list[dict] | None:
    """Return a Prometheus instant query's result, or None while it cannot answer yet.

    A starting Prometheus refuses connections, then answers 503 until its storage is open;
    any of that, or a body that is not a successful query result, means "ask again".
    """
    try:
        response = requests.get(api, params={"query": promql}, timeout=5)
        body = response.json() if response.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return None
    if not isinstance(body, dict) or body.get("status") != "success":
        return None
    return body["data"]["result"]


def send_traffic(url: str, count: int) -> None:
    for data in distinct_images(count):
        assert post_png(url, data).status_code == 200
    assert post_png(url, b"junk").status_code == 400


def test_promtool_finds_no_problem_in_the_exposition(server_factory, model_dir):
    promtool = require("promtool")
    server = server_factory(model_dir, WORKERS="2", THREADS="4")
    send_traffic(server.url, 10)
    exposition = requests.get(server.url + "/metrics", timeout=5).text
    assert "cnn_http_request_duration_seconds_bucket" in exposition
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr
    )


def test_prometheus_scrapes_the_service_and_computes_p99(server_factory, model_dir, tmp_path):
    prometheus = require("prometheus")
    server = server_factory(model_dir)
    target = server.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: cnn\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    server_timeout_s = 10  # the service's REQUEST_TIMEOUT_S: no answer takes longer
    p99_query = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(cnn_http_request_duration_seconds_bucket{endpoint="/predict"}[30s])))'
    )
    try:
        deadline = time.monotonic() + 180
        p99 = None
        while p99 is None:
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            send_traffic(server.url, 5)
            samples = query(api, p99_query)
            if samples and samples[0]["value"][1] not in ("NaN", "+Inf"):
                p99 = float(samples[0]["value"][1])
            else:
                time.sleep(0.5)
        assert 0 < p99 < server_timeout_s, f"p99 of /predict read back from Prometheus: {p99}s"
        while not (up := query(api, "up")):
            assert time.monotonic() < deadline, "Prometheus never answered 'up'"
            time.sleep(0.5)
        assert up[0]["value"][1] == "1"
        # The per-model series, queried by their labels as the README shows.
        by_model = query(api, "sum by (model, version) (cnn_images_predicted_total)")
        assert by_model and by_model[0]["metric"] == MODEL_LABELS, by_model
        assert float(by_model[0]["value"][1]) > 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
