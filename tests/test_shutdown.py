"""SIGTERM with work still in flight: every accepted request is answered, and the worker exits
by itself inside gunicorn's graceful timeout (the master's SIGKILL would not count)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.settings import Settings
from tests.conftest import RUNNER_LABELS, distinct_images
from tests.fault_app import FaultControl
from tests.load import post_png, wait_for_metric
from tests.test_faults import GREY

pytestmark = pytest.mark.slow


def wait_for_log(server, text: str, within_s: float = 60) -> None:
    """Wait until the server's log holds `text`."""
    deadline = time.monotonic() + within_s
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{server.log()[-3000:]}"
        time.sleep(0.05)


def assert_exited_by_itself(server, graceful_timeout_s: int, since: float) -> None:
    """Assert the master exits 0 within the graceful timeout, its worker not killed."""
    status = server.process.wait(graceful_timeout_s + 30)
    elapsed = time.monotonic() - since
    log = server.log()
    assert status == 0, log[-3000:]
    assert "SIGKILL" not in log, "the master had to kill its worker"
    assert "Worker exiting" in log
    assert elapsed < graceful_timeout_s, f"exit took {elapsed:.1f}s of {graceful_timeout_s}s"


def hold_and_queue(server, control: FaultControl, pool: ThreadPoolExecutor, queued: int):
    """Hold one batch in the model, queue `queued` images behind it; return the futures."""
    futures = [pool.submit(post_png, server.url, GREY)]
    control.wait_held(1)
    futures += [pool.submit(post_png, server.url, data) for data in distinct_images(queued)]
    wait_for_metric(server.url, "cnn_batch_queue_depth", queued, **RUNNER_LABELS)
    return futures


def test_requests_queued_past_the_drain_are_all_answered_and_the_worker_exits(fault_server):
    env = {"DRAIN_S": "1", "REQUEST_TIMEOUT_S": "30"}
    server, control = fault_server(**env)
    graceful = Settings.from_env(env).graceful_timeout_s
    with ThreadPoolExecutor(9) as pool:
        futures = hold_and_queue(server, control, pool, queued=8)
        server.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        # The drain ends while every request still waits on the held batch.
        wait_for_log(server, "drain over")
        assert not any(future.done() for future in futures)
        control.release(1)
        statuses = [future.result(60).status_code for future in futures]
    assert statuses == [200] * 9
    assert_exited_by_itself(server, graceful, sent)


def test_graceful_timeout_covers_a_queued_request_deadline_and_a_stuck_batch(fault_server):
    # The held batch is never released: its request waits out its deadline and the grace
    # for a running batch, the queued one its deadline; the worker must still exit in time.
    env = {"DRAIN_S": "1", "REQUEST_TIMEOUT_S": "3"}
    server, control = fault_server(**env)
    settings = Settings.from_env(env)
    with ThreadPoolExecutor(2) as pool:
        held, queued = hold_and_queue(server, control, pool, queued=1)
        server.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        wait_for_log(server, "drain over")
        held_answer = held.result(60)
        queued_answer = queued.result(60)
    assert held_answer.status_code == 504
    assert "did not finish in time" in held_answer.json()["error"]["message"]
    assert queued_answer.status_code == 504
    assert queued_answer.json()["error"]["code"] == "timeout"
    assert settings.graceful_timeout_s >= settings.drain_s + settings.request_lifetime_s
    assert_exited_by_itself(server, settings.graceful_timeout_s, sent)
