"""The batcher alone, with a fake predict_batch: batching, ordering, deadlines, failures."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batching import Batcher
from service.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded


class RecordingModel:
    """A fake model: output row i is [input value, batch size]; it records every batch."""

    def __init__(self, delay_s: float = 0.0, fail_when=None) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.fail_when = fail_when
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(10)
        time.sleep(self.delay_s)
        if self.fail_when is not None and self.fail_when(inputs):
            raise RuntimeError("injected failure")
        self.batches.append(len(inputs))
        return np.stack([inputs[:, 0], np.full(len(inputs), float(len(inputs)))], axis=1)


def make_batcher(model, **overrides) -> Batcher:
    options = {"max_batch_size": 8, "max_delay_s": 0.05, "max_queue": 32} | overrides
    batcher = Batcher(model, **options)
    batcher.start()
    return batcher


def value(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float32)


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_lone_request_runs_without_waiting_for_company():
    model = RecordingModel()
    batcher = make_batcher(model, max_delay_s=2.0)
    started = time.monotonic()
    assert batcher.predict([value(7)], later())[0][0] == 7
    assert time.monotonic() - started < 1.0, "a lone request waited for the batch window"
    batcher.close()


def test_concurrent_requests_share_batches_and_get_their_own_answers():
    model = RecordingModel()
    model.release.clear()  # hold the first batch so the others queue up behind it
    batcher = make_batcher(model)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(batcher.predict, [value(i)], later()) for i in range(16)]
        model.entered.wait(5)
        time.sleep(0.1)
        model.release.set()
        results = [f.result(10) for f in futures]
    assert [r[0][0] for r in results] == list(range(16))
    assert max(model.batches) > 1
    assert max(model.batches) <= 8
    batcher.close()


def test_a_forming_batch_waits_for_a_request_on_its_way():
    model = RecordingModel()
    batcher = make_batcher(model, max_delay_s=1.0)
    second_submitted = threading.Event()

    def second():
        with batcher.arrival() as arrival:
            time.sleep(0.1)  # "decoding"
            second_submitted.set()
            return arrival.predict([value(2)], later())

    with batcher.arrival() as first, ThreadPoolExecutor(1) as pool:
        other = pool.submit(second)
        time.sleep(0.02)
        result = first.predict([value(1)], later())
        assert other.result(5)[0][0] == 2
    assert result[0][0] == 1
    assert model.batches == [2], "the first image should have waited for the second"
    batcher.close()


def test_multi_image_request_gets_results_in_order():
    batcher = make_batcher(RecordingModel())
    results = batcher.predict([value(i) for i in range(20)], later())
    assert [r[0] for r in results] == list(range(20))
    batcher.close()


def test_full_queue_sheds_with_retry_after():
    model = RecordingModel()
    model.release.clear()
    batcher = make_batcher(model, max_queue=4, max_batch_size=1)
    with ThreadPoolExecutor(8) as pool:
        holding = pool.submit(batcher.predict, [value(0)], later())
        model.entered.wait(5)
        queued = pool.submit(batcher.predict, [value(i) for i in range(4)], later())
        time.sleep(0.05)
        with pytest.raises(Overloaded) as shed:
            batcher.predict([value(9)], later())
        assert shed.value.retry_after_s >= 1
        model.release.set()
        assert holding.result(5)[0][0] == 0
        assert len(queued.result(5)) == 4
    batcher.close()


def test_item_past_its_deadline_is_dropped_with_timeout():
    model = RecordingModel()
    model.release.clear()
    batcher = make_batcher(model, max_batch_size=1)
    with ThreadPoolExecutor(2) as pool:
        pool.submit(batcher.predict, [value(0)], later())
        model.entered.wait(5)
        with pytest.raises(DeadlineExceeded):
            batcher.predict([value(1)], time.monotonic() + 0.1)
        model.release.set()
    time.sleep(0.1)
    assert model.batches == [1], "the expired image must not reach the model"
    batcher.close()


def test_failed_forward_pass_fails_only_its_batch():
    model = RecordingModel(fail_when=lambda inputs: (inputs[:, 0] == 13).any())
    batcher = make_batcher(model)
    with pytest.raises(InferenceFailed):
        batcher.predict([value(13)], later())
    assert batcher.predict([value(4)], later())[0][0] == 4
    assert batcher.alive


def test_dead_inference_thread_reports_not_alive_and_refuses_work():
    def crash(inputs):
        raise SystemExit("the thread dies")

    batcher = make_batcher(crash)
    with pytest.raises(InferenceFailed):
        batcher.predict([value(1)], later())
    batcher._thread.join(5)
    assert not batcher.alive
    with pytest.raises(ModelNotReady):
        batcher.predict([value(2)], later())


def test_deadline_aware_admission_rejects_requests_that_cannot_make_it():
    model = RecordingModel(delay_s=0.2)
    batcher = make_batcher(model, max_batch_size=1)
    batcher.predict([value(0)], later())  # teaches the batcher a forward pass takes ~0.2 s
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(batcher.predict, [value(i)], later()) for i in range(3)]
        time.sleep(0.05)
        assert batcher.estimated_wait_s() > 0.1
        with pytest.raises(Overloaded, match="deadline"):
            batcher.predict([value(9)], time.monotonic() + 0.1)
        for future in busy:
            future.result(5)
    batcher.close()


def test_warm_up_runs_on_the_inference_thread_before_start_returns():
    seen = []
    batcher = Batcher(
        RecordingModel(),
        max_batch_size=4,
        max_delay_s=0.0,
        max_queue=8,
        warm_up=lambda: seen.append(threading.current_thread().name),
    )
    batcher.start()
    assert seen == ["batcher"]
    batcher.close()


def test_failed_warm_up_is_raised_by_start_and_leaves_the_batcher_dead():
    def broken():
        raise RuntimeError("no graph")

    batcher = Batcher(
        RecordingModel(), max_batch_size=4, max_delay_s=0.0, max_queue=8, warm_up=broken
    )
    with pytest.raises(RuntimeError, match="no graph"):
        batcher.start()
    assert not batcher.alive


def test_close_finishes_queued_work_then_refuses():
    model = RecordingModel(delay_s=0.01)
    batcher = make_batcher(model, max_batch_size=2)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batcher.predict, [value(i)], later()) for i in range(8)]
        time.sleep(0.02)
        batcher.close(timeout=5)
        answered = [f.result(5)[0][0] for f in futures]
    assert answered == list(range(8))
    with pytest.raises(ModelNotReady):
        batcher.predict([value(1)], later())
