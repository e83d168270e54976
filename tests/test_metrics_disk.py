"""A full metrics folder costs metrics, not requests: real tmpfs mounts that really fill up.

Each tmpfs is mounted in a private mount namespace (`unshare -m`, as root: the tests run as
root here and in CI) by a holder process that then sleeps; this process reaches the mount
through /proc/<holder>/root, to hand it to a server and to fill and free it.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client import Counter, Gauge, Histogram, multiprocess, values

from service import metric_values
from tests.conftest import (
    RUNNER_LABELS,
    Server,
    distinct_images,
    free_port,
    require_tool,
    unavailable,
)
from tests.load import metric, post_png, samples, scrape, worker_pids

FAILURES = "cnn_metrics_write_failures_total"
TEST_FAILURES = "test_failures_total"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def private_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount tmpfs file systems of a given size (KiB) on demand; return each one's path."""
    unshare = require_tool("unshare", "Debian package 'util-linux'")
    holders: list[subprocess.Popen[str]] = []

    def mount(size_kib: int) -> Path:
        point = tmp_path / f"tmpfs-{len(holders)}"
        point.mkdir()
        script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && echo mounted && exec sleep 3600'
        holder = subprocess.Popen(
            [unshare, "-m", "sh", "-c", script, "sh", f"{size_kib}k", str(point)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        holders.append(holder)
        assert holder.stdout is not None and holder.stderr is not None
        if holder.stdout.readline().strip() != "mounted":
            unavailable(f"cannot mount a tmpfs in a private namespace: {holder.stderr.read()}")
        return Path(f"/proc/{holder.pid}/root") / point.relative_to("/")

    yield mount
    for holder in holders:
        holder.kill()
        holder.communicate()


def fill(folder: Path) -> Path:
    """Write a file into folder until its file system is full; return the file."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as out:
        while True:
            try:
                out.write(bytes(4096))
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                return filler


def exported(folder: Path) -> Samples:
    """Return the samples of the files in folder, merged as a scrape merges them."""
    collector = multiprocess.MultiProcessCollector(None, path=str(folder))
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def wait_until(done: Callable[[], bool], what: str, within_s: float = 60) -> None:
    """Poll done() until it holds; fail after within_s."""
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {within_s}s"
        time.sleep(0.1)


@pytest.fixture
def file_values(monkeypatch: pytest.MonkeyPatch, private_tmpfs: Callable[[int], Path]) -> Path:
    """Make new metrics keep their values in reserved files on a 64 KiB tmpfs; return it."""
    folder = private_tmpfs(64)
    monkeypatch.setattr(values, "ValueClass", metric_values.value_class(str(folder), TEST_FAILURES))
    return folder


def in_memory(counter: Counter) -> float:
    """Return a counter's value as its process holds it, whether in a file or not."""
    return next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))


@pytest.fixture
def logged_errors(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], int]:
    """Return a function counting the ERROR lines service.metric_values has logged."""
    # The service's JSON logging stops its records at "service"; caplog listens at the root.
    monkeypatch.setattr(logging.getLogger("service"), "propagate", True)

    def count() -> int:
        return sum(
            record.name == "service.metric_values" and record.levelno == logging.ERROR
            for record in caplog.records
        )

    return count


def test_metrics_made_on_a_full_folder_are_kept_in_memory_then_written(
    file_values: Path, logged_errors: Callable[[], int]
) -> None:
    filler = fill(file_values)
    failures = Counter("test_failures", "Samples kept in memory.", registry=None)
    errors = Counter("test_errors", "Errors.", ["code"], registry=None)
    depth = Gauge("test_depth", "Depth.", registry=None, multiprocess_mode="livesum")
    latency = Histogram("test_seconds", "Latency.", buckets=(1.0,), registry=None)
    errors.labels("a").inc(2)
    errors.labels("b").inc()
    depth.set(5)
    latency.observe(0.25)
    poll = errors.labels("poll")

    assert sorted(os.listdir(file_values)) == ["filler"], "an empty or half-made file was left"
    assert exported(file_values) == {}
    assert in_memory(failures) == 8  # itself, 2 errors, the gauge, 2 buckets + sum, poll
    assert logged_errors() == 1

    filler.unlink()

    def written() -> bool:
        poll.inc(0)  # a write: the kept values are retried on writes
        return (TEST_FAILURES, ()) in exported(file_values)

    wait_until(written, "the kept values reached the files")
    samples = exported(file_values)
    assert samples[(TEST_FAILURES, ())] == 8
    assert samples[("test_errors_total", (("code", "a"),))] == 2
    assert samples[("test_errors_total", (("code", "b"),))] == 1
    assert samples[("test_depth", ())] == 5
    assert samples[("test_seconds_count", ())] == 1
    assert samples[("test_seconds_sum", ())] == 0.25
    assert logged_errors() == 1


def test_a_file_that_cannot_grow_keeps_its_new_values_and_loses_none(
    file_values: Path, logged_errors: Callable[[], int]
) -> None:
    failures = Counter("test_failures", "Samples kept in memory.", registry=None)
    errors = Counter("test_errors", "Errors.", ["code"], registry=None)
    errors.labels("before").inc()
    filler = fill(file_values)
    codes = [f"code-{i}" for i in range(200)]  # ~20 KB of keys: the 4 KiB file must grow
    for count, code in enumerate(codes, 1):
        errors.labels(code).inc(count)

    during = exported(file_values)  # the file as it was stays readable
    assert during[("test_errors_total", (("code", "before"),))] == 1
    assert 0 < in_memory(failures) < len(codes)
    assert logged_errors() == 1

    filler.unlink()

    def written() -> bool:
        errors.labels("before").inc(0)
        return ("test_errors_total", (("code", codes[-1]),)) in exported(file_values)

    wait_until(written, "the kept values reached the file")
    samples = exported(file_values)
    for count, code in enumerate(codes, 1):
        assert samples[("test_errors_total", (("code", code),))] == count
    assert samples[(TEST_FAILURES, ())] == in_memory(failures)


def test_a_process_that_reuses_a_dead_ones_pid_carries_on_from_its_file(
    file_values: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Counter("test_images", "Images.", registry=None).inc(3)
    # A second value class on the folder is a new process with the same pid.
    monkeypatch.setattr(values, "ValueClass", metric_values.value_class(str(file_values), "x"))
    Counter("test_images", "Images.", registry=None).inc(2)
    assert exported(file_values)[("test_images_total", ())] == 5


def json_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines()]


def boots(server: Server) -> int:
    """Return how many workers gunicorn has started."""
    return sum("Booting worker" in line["message"] for line in json_lines(server))


def wait_for_replacement(server: Server, dead: int, within_s: float = 180) -> int:
    """Wait until one new worker is ready; fail at once if workers keep dying."""
    deadline = time.monotonic() + within_s
    while True:
        assert boots(server) <= 2, f"workers keep dying:\n{server.log()[-3000:]}"
        assert time.monotonic() < deadline, f"no ready worker in {within_s}s"
        pids = worker_pids(server.process.pid)
        if pids and dead not in pids:
            try:
                if requests.get(server.url + "/readyz", timeout=2).status_code == 200:
                    [pid] = pids
                    return pid
            except requests.RequestException:
                pass
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("own_metrics_port", [False, True], ids=["app-port", "metrics-port"])
def test_a_full_metrics_folder_costs_metrics_not_requests(
    server_factory: Callable[..., Server],
    model_dir: Path,
    private_tmpfs: Callable[[int], Path],
    own_metrics_port: bool,
) -> None:
    folder = private_tmpfs(512)
    metrics_port = free_port() if own_metrics_port else 0
    server = server_factory(
        model_dir,
        WORKERS="1",
        THREADS="4",
        METRICS_PORT=str(metrics_port),
        PROMETHEUS_MULTIPROC_DIR=str(folder),
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}" if metrics_port else server.url
    images = iter(distinct_images(20))
    predicted = 0

    def predict() -> None:
        nonlocal predicted
        response = post_png(server.url, next(images))
        assert response.status_code == 200, response.text
        predicted += 1

    predict()  # every slot a prediction needs exists before the folder fills
    first = worker_pids(server.process.pid)[0]
    filler = fill(folder)

    # Label values never used before need new slots in the first worker's files.
    assert requests.get(server.url + "/nowhere", timeout=10).status_code == 404
    assert requests.post(server.url + "/readyz", timeout=10).status_code == 405
    assert post_png(server.url, b"junk").status_code == 400
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    for _ in range(3):
        predict()
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
    scrape(metrics_url)  # no file in the folder is empty or half-made
    assert worker_pids(server.process.pid) == [first]

    # Its replacement must make every file anew, on the full folder.
    os.kill(first, signal.SIGKILL)
    replacement = wait_for_replacement(server, first)
    fill(folder)  # again: mark_process_dead removed the dead worker's live-gauge files
    unsupported = 3  # an error code first used now
    for _ in range(unsupported):
        response = requests.post(
            server.url + "/predict", data=b"x", headers={"Content-Type": "text/plain"}, timeout=30
        )
        assert response.status_code == 415
    for _ in range(3):
        predict()
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
    scrape(metrics_url)
    assert worker_pids(server.process.pid) == [replacement]
    assert boots(server) == 2

    errors = collections.Counter(
        line["pid"]
        for line in json_lines(server)
        if line["logger"] == "service.metric_values" and line["level"] == "ERROR"
    )
    assert errors[replacement] == 1, server.log()[-3000:]
    assert max(errors.values()) == 1, errors

    filler.unlink()

    def recovered() -> bool:
        requests.get(server.url + "/healthz", timeout=10)  # a write, which retries the files
        text = scrape(metrics_url)
        # cnn_ready: a live gauge the replacement set during the outage.
        return sum(samples(text, FAILURES)) > 0 and samples(text, "cnn_ready") == [1]

    wait_until(recovered, "the kept values reached the files")
    text = scrape(metrics_url)
    # The first worker's count was in its file; the replacement's was kept, then written.
    assert metric(text, "cnn_images_predicted_total", **RUNNER_LABELS) == predicted
    assert (
        metric(text, "cnn_errors_total", code="unsupported_media_type", protocol="http")
        == unsupported
    )
    assert worker_pids(server.process.pid) == [replacement]
    assert boots(server) == 2
    assert "SIGBUS" not in server.log()
    assert not [name for name in os.listdir(folder) if not name.endswith(".db")]
