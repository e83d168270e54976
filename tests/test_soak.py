"""Soak: 100,000 requests through a real gunicorn leave its memory, threads and files flat."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from tests.conftest import expected_probabilities, image_bytes
from tests.load import (
    assert_correct,
    only_worker,
    post_png,
    proc_status,
    run_wrk,
    wait_until_idle,
)

pytestmark = pytest.mark.slow

WARM_UP_REQUESTS = 5_000
SOAK_REQUESTS = 100_000


@dataclass(frozen=True)
class Footprint:
    """What a process holds: resident memory, threads, open file descriptors."""

    rss_mb: float
    threads: int
    fds: int


def footprint(pid: int) -> Footprint:
    """Return the process's footprint, from /proc."""
    return Footprint(
        rss_mb=proc_status(pid, "VmRSS") / 1024,
        threads=proc_status(pid, "Threads"),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def test_100k_requests_grow_neither_memory_nor_threads_nor_open_files(
    server_factory, model_dir, cnn, classifier, tmp_path
):
    server = server_factory(model_dir)  # one worker, 16 threads
    data = image_bytes((32, 32), seed=31)
    expected = expected_probabilities(cnn, data, classifier.info.spec)
    body = tmp_path / "body.png"
    body.write_bytes(data)
    url = server.url + "/predict"
    worker = only_worker(server.process.pid)

    # Warm-up: every request thread started, allocator arenas and caches filled.
    warm_up = run_wrk(
        url, body, "image/png", connections=16, duration_s=30, stop_after=WARM_UP_REQUESTS
    )
    assert set(warm_up["statuses"]) == {"200"}, warm_up
    wait_until_idle(server.url)
    before = footprint(worker)

    started = time.monotonic()
    soak = run_wrk(url, body, "image/png", connections=16, duration_s=200, stop_after=SOAK_REQUESTS)
    elapsed = time.monotonic() - started
    wait_until_idle(server.url)
    after = footprint(worker)
    answered = soak["statuses"].get("200", 0)
    print(
        f"\nsoak: {answered} answers in {elapsed:.1f} s ({answered / elapsed:.0f}/s), "
        f"statuses {soak['statuses']}, errors {soak['errors']}, p99 {soak['p99_us'] / 1e3:.1f} ms;"
        f"\nworker after warm-up: {before}\nworker after soak:    {after}"
    )

    assert set(soak["statuses"]) == {"200"}, soak["statuses"]
    assert answered >= SOAK_REQUESTS
    assert not any(soak["errors"][kind] for kind in ("connect", "read", "write", "timeout"))
    assert after.rss_mb - before.rss_mb < 50
    # Both figures are taken with wrk's connections closed and the server idle, so the same
    # threads (16 request threads, the batcher, TensorFlow's pools) and the same files
    # (listener, model, metric files, logs) are all there should be; a slack of 2 allows for
    # a connection of the idle check itself still being closed at the moment of counting.
    assert after.threads <= before.threads
    assert after.fds <= before.fds + 2
    assert_correct(post_png(server.url, data), expected)
