"""Soak: rounds of 10,000 requests through a real gunicorn leave its memory, threads and
open files flat; judged by request count, never by how fast they are answered."""

from __future__ import annotations

import os
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

WARM_UP_REQUESTS = 3_000
ROUND_REQUESTS = 10_000
ROUNDS = 3
# Each wrk run stops after its count of answers; this only bounds it, and is generous enough
# for a machine 5x slower than the 2-core development one (which answers ~300-1,000/s).
ROUND_LIMIT_S = 600
# Resident memory a worker may gain per 10,000 requests once warm: allocator arenas and
# caches settle in the first round, so a leak of even ~400 bytes a request stands out.
MAX_GROWTH_MB_PER_ROUND = 4.0


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


def test_requests_grow_neither_memory_nor_threads_nor_open_files(
    server_factory, model_dir, cnn, classifier, tmp_path
):
    server = server_factory(model_dir)  # one worker, 16 threads
    data = image_bytes((32, 32), seed=31)
    expected = expected_probabilities(cnn, data, classifier.info.spec)
    body = tmp_path / "body.png"
    body.write_bytes(data)
    url = server.url + "/predict"
    worker = only_worker(server.process.pid)

    def run(count: int) -> Footprint:
        result = run_wrk(
            url, body, "image/png", connections=16, duration_s=ROUND_LIMIT_S, stop_after=count
        )
        assert set(result["statuses"]) == {"200"}, result
        assert result["statuses"]["200"] >= count, result
        assert not any(result["errors"][kind] for kind in ("connect", "read", "write", "timeout"))
        wait_until_idle(server.url)
        return footprint(worker)

    # Warm-up: every request thread started, allocator arenas and caches filled.
    footprints = [run(WARM_UP_REQUESTS)]
    footprints += [run(ROUND_REQUESTS) for _ in range(ROUNDS)]
    print("\nworker footprint after warm-up and each round of 10,000 requests:")
    print("\n".join(f"  {f}" for f in footprints))

    # Growth per round, measured from the end of the first round (the warm-up's own tail of
    # allocations settles there) to the end of the last.
    settled, last = footprints[1], footprints[-1]
    growth_per_round = (last.rss_mb - settled.rss_mb) / (ROUNDS - 1)
    assert growth_per_round < MAX_GROWTH_MB_PER_ROUND, footprints
    # Both figures are taken with wrk's connections closed and the server idle, so the same
    # threads (16 request threads, the batcher, TensorFlow's pools) and the same files
    # (listener, model, metric files, logs) are all there should be; a slack of 2 allows for
    # a connection of the idle check itself still being closed at the moment of counting.
    for earlier in footprints[1:]:
        assert last.threads <= earlier.threads, footprints
        assert last.fds <= earlier.fds + 2, footprints
    assert_correct(post_png(server.url, data), expected)
