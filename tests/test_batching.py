"""The batcher alone, with a fake predict_batch: batching, ordering, deadlines, failures.

Requests go in through `Batcher.submit`, as the runner's core puts them (service.runner.core);
`predict` below waits for their futures as the core does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait

import numpy as np
import pytest

from service.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded
from service.metrics import for_model
from service.runner.batching import Arrival, Batcher


class RecordingModel:
    """A fake model: output row i is [input value, batch size]; it records every batch."""

    def __init__(self, fail_when=None) -> None:
        self.batches: list[int] = []
        self.values: list[float] = []
        self._first_size: int | None = None
        self.fail_when = fail_when
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def first_batch_size(self) -> int:
        """Return the size of the first batch the model was handed (after `entered`)."""
        assert self._first_size is not None
        return self._first_size

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        if self._first_size is None:
            self._first_size = len(inputs)
        self.entered.set()
        self.release.wait(10)
        if self.fail_when is not None and self.fail_when(inputs):
            raise RuntimeError("injected failure")
        self.batches.append(len(inputs))
        self.values.extend(inputs[:, 0].tolist())
        return np.stack([inputs[:, 0], np.full(len(inputs), float(len(inputs)))], axis=1)


def make_batcher(model, **overrides) -> Batcher:
    options = {
        "max_batch_size": 8,
        "max_delay_s": 0.05,
        "max_queue": 32,
        "model_metrics": for_model("test", "1"),
    }
    options |= overrides
    batcher = Batcher(model, **options)
    batcher.start()
    return batcher


def predict(
    batcher: Batcher,
    inputs: Sequence[np.ndarray],
    deadline: float,
    arrival: Arrival | None = None,
) -> list[np.ndarray]:
    """Submit `inputs` and return their outputs, in order, as the runner's core answers them:
    at `deadline` the images still queued are cancelled (a DeadlineExceeded), those in a
    running batch are waited for; the first failure is raised."""
    futures = batcher.submit(inputs, deadline, arrival)
    wait(futures, timeout=max(0.0, deadline - time.monotonic()))
    for future in futures:
        future.cancel()  # only those not yet running: what RunnerCore.expire does
    try:
        # A running batch is answered whenever it ends (the worker's grace is not the
        # batcher's); 30 s only keeps a broken batcher from hanging the test.
        return [future.result(timeout=30) for future in futures]
    except CancelledError:
        raise DeadlineExceeded("the request timed out waiting in the batch queue") from None


def teach(batcher: Batcher, model: RecordingModel, forward_s: float) -> None:
    """Run one batch lasting at least `forward_s`, so the wait estimate learns that a forward
    pass takes that long; leave the model holding its next batch until `release` is set."""
    model.entered.clear()
    model.release.clear()
    with ThreadPoolExecutor(1) as pool:
        teacher = pool.submit(predict, batcher, [value(-1)], later(60))
        assert model.entered.wait(30)
        time.sleep(forward_s)
        model.release.set()
        teacher.result(30)
    model.entered.clear()
    model.release.clear()


def value(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float32)


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_lone_request_runs_without_waiting_for_company():
    model = RecordingModel()
    batcher = make_batcher(model, max_delay_s=60.0)
    started = time.monotonic()
    assert predict(batcher, [value(7)], later(120))[0][0] == 7
    # Waiting out the window would take 60 s; the fake model answers in microseconds.
    assert time.monotonic() - started < 30, "a lone request waited for the batch window"
    batcher.close()


def test_concurrent_requests_share_batches_and_get_their_own_answers():
    model = RecordingModel()
    model.release.clear()  # hold the first batch so the others queue up behind it
    batcher = make_batcher(model)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(predict, batcher, [value(i)], later(60)) for i in range(16)]
        assert model.entered.wait(30)
        assert batcher.wait_queued(16 - model.first_batch_size(), timeout=30)
        model.release.set()
        results = [f.result(10) for f in futures]
    assert [r[0][0] for r in results] == list(range(16))
    assert max(model.batches) > 1
    assert max(model.batches) <= 8
    batcher.close()


def test_a_forming_batch_waits_for_a_request_on_its_way():
    model = RecordingModel()
    batcher = make_batcher(model, max_delay_s=60.0)
    second_arrived, second_may_submit = threading.Event(), threading.Event()

    def first():
        with batcher.arrival() as arrival:
            return predict(batcher, [value(1)], later(120), arrival)

    def second():
        with batcher.arrival() as arrival:
            second_arrived.set()
            second_may_submit.wait(30)  # "decoding"
            return predict(batcher, [value(2)], later(120), arrival)

    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(second)
        assert second_arrived.wait(30)
        one = pool.submit(first)
        # The first image is queued while the second request is still on its way: the batch
        # must wait for it rather than run alone.
        assert batcher.wait_queued(1, timeout=30)
        second_may_submit.set()
        assert one.result(30)[0][0] == 1
        assert other.result(30)[0][0] == 2
    assert model.batches == [2], "the first image should have waited for the second"
    batcher.close()


def test_a_forming_batch_stops_waiting_at_the_window_end():
    model = RecordingModel()
    batcher = make_batcher(model, max_delay_s=0.05)
    never = threading.Event()

    def stalled():
        with batcher.arrival():
            never.wait(60)  # a request on its way that never submits

    with ThreadPoolExecutor(1) as pool:
        pool.submit(stalled)
        # Answered although a request is still announced: the window closed after 0.05 s.
        assert predict(batcher, [value(3)], later(60))[0][0] == 3
        never.set()
    assert model.batches == [1]
    batcher.close()


def test_multi_image_request_gets_results_in_order():
    model = RecordingModel()
    batcher = make_batcher(model)
    results = predict(batcher, [value(i) for i in range(20)], later())
    assert [r[0] for r in results] == list(range(20))
    assert model.values == list(range(20)), "images run in the order they were queued"
    assert model.batches == [8, 8, 4]
    batcher.close()


def test_wait_queued_tells_whether_the_images_arrived():
    model = RecordingModel()
    model.release.clear()
    batcher = make_batcher(model, max_batch_size=1)
    assert not batcher.wait_queued(1, timeout=0.01), "nothing is queued yet"
    with ThreadPoolExecutor(2) as pool:
        pool.submit(predict, batcher, [value(0)], later(60))
        assert model.entered.wait(30)
        queued = pool.submit(predict, batcher, [value(1), value(2)], later(60))
        assert batcher.wait_queued(2, timeout=30)
        assert not batcher.wait_queued(3, timeout=0.01)
        model.release.set()
        queued.result(30)
    batcher.close()


def test_full_queue_sheds_with_retry_after():
    model = RecordingModel()
    batcher = make_batcher(model, max_queue=4, max_batch_size=1)
    teach(batcher, model, forward_s=0.6)
    with ThreadPoolExecutor(8) as pool:
        holding = pool.submit(predict, batcher, [value(0)], later(60))
        assert model.entered.wait(30)
        queued = pool.submit(predict, batcher, [value(i) for i in range(4)], later(60))
        assert batcher.wait_queued(4, timeout=30)
        with pytest.raises(Overloaded) as shed:
            predict(batcher, [value(9)], later())
        # Four queued batches of >= 0.6 s each: come back in no less than 3 s.
        assert shed.value.retry_after_s >= 3
        model.release.set()
        assert holding.result(30)[0][0] == 0
        assert len(queued.result(30)) == 4
    batcher.close()


def test_item_past_its_deadline_is_dropped_with_timeout():
    model = RecordingModel()
    model.release.clear()
    batcher = make_batcher(model, max_batch_size=1)
    with ThreadPoolExecutor(2) as pool:
        holding = pool.submit(predict, batcher, [value(0)], later(60))
        assert model.entered.wait(30)
        with pytest.raises(DeadlineExceeded):
            predict(batcher, [value(1)], time.monotonic() + 0.1)
        model.release.set()
        holding.result(30)
    # The batcher runs in order: once a later image is answered, the expired one was handled.
    assert predict(batcher, [value(2)], later(60))[0][0] == 2
    assert model.batches == [1, 1], "the expired image must not reach the model"
    assert model.values == [0, 2]
    batcher.close()


def test_failed_forward_pass_fails_only_its_batch():
    model = RecordingModel(fail_when=lambda inputs: (inputs[:, 0] == 13).any())
    batcher = make_batcher(model)
    with pytest.raises(InferenceFailed):
        predict(batcher, [value(13)], later())
    assert predict(batcher, [value(4)], later())[0][0] == 4
    assert batcher.alive


def test_dead_inference_thread_reports_not_alive_and_refuses_work():
    def crash(inputs):
        raise SystemExit("the thread dies")

    batcher = make_batcher(crash)
    with pytest.raises(InferenceFailed):
        predict(batcher, [value(1)], later())
    batcher._thread.join(5)
    assert not batcher.alive
    with pytest.raises(ModelNotReady):
        predict(batcher, [value(2)], later())


def test_deadline_aware_admission_rejects_requests_that_cannot_make_it():
    model = RecordingModel()
    batcher = make_batcher(model, max_batch_size=1)
    teach(batcher, model, forward_s=0.2)
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(predict, batcher, [value(i)], later(60)) for i in range(3)]
        assert model.entered.wait(30)
        assert batcher.wait_queued(2, timeout=30)
        assert batcher.estimated_wait_s() >= 0.4  # two queued batches of >= 0.2 s each
        with pytest.raises(Overloaded, match="deadline"):
            predict(batcher, [value(9)], time.monotonic() + 0.1)
        model.release.set()
        for future in busy:
            future.result(30)
    assert 9 not in model.values, "the refused image must not reach the model"
    batcher.close()


def test_a_partly_filled_batch_counts_as_a_whole_forward_pass_in_the_estimate():
    model = RecordingModel()
    batcher = make_batcher(model, max_batch_size=8)
    teach(batcher, model, forward_s=0.2)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(predict, batcher, [value(1)], later(60))
        assert model.entered.wait(30)
        queued = pool.submit(predict, batcher, [value(2)], later(60))
        assert batcher.wait_queued(1, timeout=30)
        # One image queued of a batch of 8 still needs one whole forward pass.
        assert batcher.estimated_wait_s() >= 0.2
        with pytest.raises(Overloaded, match="deadline"):
            predict(batcher, [value(9)], time.monotonic() + 0.1)
        model.release.set()
        busy.result(30)
        queued.result(30)
    batcher.close()


def test_request_past_its_deadline_still_gets_its_running_batch():
    # The batcher's part of "a batch running at the deadline is still answered": cancelling
    # at the deadline, as RunnerCore.expire does, leaves an image in a running batch alone,
    # and its answer still comes. How long the worker waits for it (its deadline, then
    # RUNNING_BATCH_GRACE_S, then "did not finish in time") is service/channel/client.py's.
    model = RecordingModel()
    model.release.clear()
    batcher = make_batcher(model, max_batch_size=1)
    deadline = time.monotonic() + 1.0
    [future] = batcher.submit([value(5)], deadline)
    assert model.entered.wait(30)
    time.sleep(max(0.0, deadline - time.monotonic()) + 0.2)  # passes while the batch runs
    assert not future.cancel(), "an image in a running batch was cancelled at its deadline"
    model.release.set()
    assert future.result(30)[0] == 5
    batcher.close()


def test_image_whose_batch_starts_past_its_deadline_fails_without_running():
    # Not cancelled yet (the core's expiry comes a moment later): the batcher itself drops it.
    model = RecordingModel()
    model.release.clear()
    batcher = make_batcher(model, max_batch_size=1)
    [holding] = batcher.submit([value(0)], later(60))
    assert model.entered.wait(30)
    [late] = batcher.submit([value(1)], time.monotonic() + 0.1)
    time.sleep(0.3)
    model.release.set()
    assert holding.result(30)[0] == 0
    with pytest.raises(DeadlineExceeded, match="timed out in the queue"):
        late.result(30)
    assert model.values == [0], "the expired image must not reach the model"
    batcher.close()


def test_warm_up_runs_on_the_inference_thread_before_start_returns():
    seen = []
    batcher = Batcher(
        RecordingModel(),
        max_batch_size=4,
        max_delay_s=0.0,
        max_queue=8,
        model_metrics=for_model("test", "1"),
        warm_up=lambda: seen.append(threading.current_thread().name),
    )
    batcher.start()
    assert seen == ["batcher"]
    batcher.close()


def test_failed_warm_up_is_raised_by_start_and_leaves_the_batcher_dead():
    def broken():
        raise RuntimeError("no graph")

    batcher = Batcher(
        RecordingModel(),
        max_batch_size=4,
        max_delay_s=0.0,
        max_queue=8,
        model_metrics=for_model("test", "1"),
        warm_up=broken,
    )
    with pytest.raises(RuntimeError, match="no graph"):
        batcher.start()
    assert not batcher.alive


def test_close_finishes_queued_work_then_refuses():
    model = RecordingModel()
    model.release.clear()
    batcher = make_batcher(model, max_batch_size=2)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(predict, batcher, [value(i)], later(60)) for i in range(8)]
        assert model.entered.wait(30)
        assert batcher.wait_queued(8 - model.first_batch_size(), timeout=30)
        closer = threading.Thread(target=batcher.close, kwargs={"timeout": 30})
        closer.start()
        deadline = time.monotonic() + 30
        while batcher.alive:  # close() has not yet marked the batcher closing
            assert time.monotonic() < deadline
            time.sleep(0.001)
        model.release.set()
        answered = sorted(f.result(30)[0][0] for f in futures)
        closer.join(30)
    assert answered == list(range(8))
    with pytest.raises(ModelNotReady):
        predict(batcher, [value(1)], later())
