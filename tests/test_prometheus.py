"""The metrics as Prometheus itself reads them: promtool's linter and a real scraping server."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest
import requests

from tests.conftest import distinct_images, free_port
from tests.load import post_png

pytestmark = pytest.mark.slow


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package 'prometheus'; .ci/run installs it)")
    return path


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
    query = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(cnn_http_request_duration_seconds_bucket{endpoint="/predict"}[30s])))'
    )
    try:
        deadline = time.monotonic() + 60
        p99 = None
        while time.monotonic() < deadline:
            send_traffic(server.url, 5)
            try:
                result = requests.get(api, params={"query": query}, timeout=5).json()
            except requests.ConnectionError:
                time.sleep(0.5)
                continue
            samples = result["data"]["result"]
            if samples and samples[0]["value"][1] not in ("NaN", "+Inf"):
                p99 = float(samples[0]["value"][1])
                break
            time.sleep(0.5)
        assert p99 is not None, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert 0 < p99 < 10, f"p99 of /predict read back from Prometheus: {p99}s"
        up = requests.get(api, params={"query": "up"}, timeout=5).json()["data"]["result"]
        assert up[0]["value"][1] == "1"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
