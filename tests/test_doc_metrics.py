"""Every metric the README and the docs name is one a live server exports.

The server is driven through what makes each family appear: predictions over HTTP and gRPC
(an explanation and a bad image among them), a version that fails to load, and a restart
of its gRPC front end. A name in the docs that no live /metrics holds fails here, so a
renamed or dropped metric cannot linger in the docs.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import LABELS, distinct_images, free_port, make_cnn, start_server, write_model
from tests.load import grpc_pids, post_png, samples, scrape
from tests.test_grpc import image_request

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAME = re.compile(r"\bcnn_[a-z0-9_]+")


def documented_names() -> dict[str, list[str]]:
    """Return each cnn_ metric name the docs mention, with the files that mention it."""
    found: dict[str, list[str]] = {}
    for path in DOCUMENTS:
        for name in sorted(set(NAME.findall(path.read_text(encoding="utf-8")))):
            found.setdefault(name, []).append(path.name)
    return found


def appears(url: str, name: str, within_s: float = 60, **labels: str) -> None:
    """Wait until /metrics holds a sample `name` with `labels` of at least 1."""
    deadline = time.monotonic() + within_s
    while sum(samples(scrape(url), name, **labels)) < 1:
        assert time.monotonic() < deadline, f"{name}{labels} never appeared"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Return every family and sample name a live server exports once exercised."""
    folder = tmp_path_factory.mktemp("doc-metrics")
    repository = folder / "models"
    write_model(repository / "shapes" / "1", make_cnn(), LABELS)
    grpc_port = free_port()
    server = start_server(
        repository / "shapes",
        folder,
        GRPC_PORT=str(grpc_port),
        MODEL_VERSION_POLICY="all",
        MODEL_POLL_S="0.2",
        LOW_CONFIDENCE="1",
    )
    try:
        assert post_png(server.url, distinct_images(1)[0]).status_code == 200
        assert post_png(server.url, distinct_images(1)[0], "?explain=gradcam").status_code == 200
        assert post_png(server.url, b"not an image").status_code == 400
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(image_request(distinct_images(1)), timeout=30)
        # A version that cannot be loaded (labels that do not fit the model), moved in whole.
        broken = write_model(folder / "staging", make_cnn(), LABELS)
        (broken / "labels.json").write_text('["only one"]')
        broken.rename(repository / "shapes" / "2")
        appears(server.url, "cnn_model_load_failures_total", model="shapes", version="2")
        [pid] = grpc_pids(server.process.pid)
        os.kill(pid, signal.SIGKILL)
        appears(server.url, "cnn_runner_restarts_total", runner="grpc")
        deadline = time.monotonic() + 60
        while not requests.get(server.url + "/readyz", timeout=10).ok:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        text = scrape(server.url)
    finally:
        server.stop()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_the_docs_name_metrics():
    assert len(documented_names()) >= 20, "the metric pattern no longer finds the docs' names"


@pytest.mark.parametrize("name", sorted(documented_names()))
def test_every_metric_the_docs_name_is_exported(exported, name):
    # A counter's family is named without _total, its samples with it: both count.
    assert name in exported, f"{name} ({', '.join(documented_names()[name])}) is not exported"
