"""Helpers for tests against a live server: requests, metrics, wrk, and /proc figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families
from requests import Response


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Return the values of the samples called `name` whose labels include `labels`."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


def metric(text: str, name: str, **labels: str) -> float:
    """Return the value of the one sample called `name` with exactly these labels."""
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels == labels
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in the exposition"
    return found[0]


def scrape(url: str) -> str:
    """Return the server's /metrics exposition."""
    response = requests.get(url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def wait_for_metric(
    url: str, name: str, at_least: float, within_s: float = 60, **labels: str
) -> float:
    """Poll /metrics until the sample `name` (with exactly `labels`) reaches `at_least`."""
    deadline = time.monotonic() + within_s
    while (value := metric(scrape(url), name, **labels)) < at_least:
        assert time.monotonic() < deadline, f"{name} stayed at {value}, below {at_least}"
        time.sleep(0.02)
    return value


def post_png(url: str, data: bytes, query: str = "", **headers: str) -> requests.Response:
    """POST `data` as a raw image/png body to `url`/predict`query`."""
    headers = {"Content-Type": "image/png", **headers}
    return requests.post(f"{url}/predict{query}", data=data, headers=headers, timeout=30)


WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_status.lua"


def children(master_pid: int) -> list[int]:
    """Return the PIDs of the master's children: its workers and runners."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue  # gone meanwhile
            if f"\nPPid:\t{master_pid}\n" in status:
                found.append(int(entry))
    return sorted(found)


def _runs(pid: int, module: bytes) -> bool:
    try:
        return b"\0-m\0" + module + b"\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def worker_pids(master_pid: int) -> list[int]:
    """Return the PIDs of the gunicorn workers (the master's forked children)."""
    spawned = (b"service.runner", b"service.frontend.grpc")
    return [p for p in children(master_pid) if not any(_runs(p, m) for m in spawned)]


def runner_pids(master_pid: int) -> list[int]:
    """Return the PIDs of the runners (`python -m service.runner`, the master's children)."""
    return [pid for pid in children(master_pid) if _runs(pid, b"service.runner")]


def grpc_pids(master_pid: int) -> list[int]:
    """Return the PID of the gRPC front end (`python -m service.frontend.grpc`), if it runs."""
    return [pid for pid in children(master_pid) if _runs(pid, b"service.frontend.grpc")]


def proc_status(pid: int, field: str) -> int:
    """Return the number of one /proc/PID/status field (VmRSS in kB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def wait_until_dead(pid: int, within_s: float) -> float:
    """Wait until process `pid` has exited (a zombie, or reaped); return when, by monotonic.

    kill() returns before the process is gone: a thread of it that was preempted inside a
    system call (accept, say) finishes that call first. Only a zombie has closed its sockets.
    """
    deadline = time.monotonic() + within_s
    while True:
        try:
            # The state follows the parenthesised command name, which may hold spaces.
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return time.monotonic()  # reaped
        if state in ("Z", "X"):
            return time.monotonic()
        assert time.monotonic() < deadline, f"process {pid} still {state} after {within_s}s"
        time.sleep(0.001)


def only_worker(master_pid: int) -> int:
    """Return the PID of the one worker of a WORKERS=1 server."""
    [pid] = worker_pids(master_pid)
    return pid


def run_wrk(
    url: str,
    body: Path,
    content_type: str,
    *,
    connections: int,
    duration_s: int,
    stop_after: int = 0,
) -> dict:
    """POST `body` to `url` with wrk (one thread) and return tests/wrk_status.lua's summary.

    With `stop_after`, wrk is interrupted (SIGINT: it still prints its summary) as soon as
    that many answers have come, so `duration_s` is only an upper bound.
    """
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "15s"]
    command += ["-s", str(WRK_SCRIPT), url, "--", str(body), content_type]
    command += [str(stop_after)] if stop_after else []
    lines = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if line.strip() == "stopped":
                    process.send_signal(signal.SIGINT)
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
    output = "".join(lines)
    assert process.returncode == 0, output
    summary = [line for line in lines if line.startswith("{")]
    assert summary, output
    return json.loads(summary[-1])


class PeakRss:
    """Sample a process's VmRSS every 0.1 s in a thread, keeping the largest (kB)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = proc_status(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_kb = max(self.peak_kb, proc_status(self.pid, "VmRSS"))


def assert_correct(response: Response, expected: np.ndarray) -> None:
    assert response.status_code == 200, response.text
    got = response.json()["predictions"][0]["probabilities"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def predictions_answered(url: str) -> int:
    """Return how many /predict requests the server has answered (any status)."""
    counts = samples(scrape(url), "cnn_http_request_duration_seconds_count", endpoint="/predict")
    return int(sum(counts))


def wait_until_idle(url: str, within_s: float = 30) -> float:
    """Wait until the server answers no more /predict requests; return how long it took."""
    started = time.monotonic()
    answered = predictions_answered(url)
    while True:
        time.sleep(0.5)
        now = predictions_answered(url)
        if now == answered:
            return time.monotonic() - started
        assert time.monotonic() - started < within_s, "the server never went idle"
        answered = now


def wait_for_ready_workers(url: str, count: int, within_s: float) -> float:
    """Wait until cnn_ready says `count` workers are ready; return how long it took."""
    started = time.monotonic()
    while metric(scrape(url), "cnn_ready") != count:
        assert time.monotonic() - started < within_s, f"not {count} ready workers in {within_s}s"
        time.sleep(0.2)
    return time.monotonic() - started
