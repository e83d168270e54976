"""Dynamic batching: request threads enqueue images, one inference thread runs them in batches.

The batcher knows no web framework and no model: it is handed a `predict_batch` callable that
maps an (N, ...) array to an (N, classes) array. It waits for company only while another
request is known to be on its way (being read and decoded by another thread), and never longer
than `max_delay_s` after a batch's first image, so a lone request at low load runs at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded
from service.metrics import ModelMetrics

log = logging.getLogger(__name__)

PredictBatch = Callable[[np.ndarray], np.ndarray]

# Weight of the newest forward-pass time in the moving average behind the wait estimate.
_EWMA_WEIGHT = 0.2


@dataclass
class _Item:
    array: np.ndarray
    deadline: float
    enqueued_at: float
    future: Future = field(default_factory=Future)


class Batcher:
    """A bounded queue of single images and the one thread that runs the model on them."""

    def __init__(
        self,
        predict_batch: PredictBatch,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        model_metrics: ModelMetrics,
        warm_up: Callable[[], None] | None = None,
        on_death: Callable[[], None] | None = None,
    ) -> None:
        """Batch for `predict_batch`, recording into `model_metrics`. `on_death` is called
        when the inference thread dies, before its batch is failed."""
        self._predict_batch = predict_batch
        self.metrics = model_metrics
        self._warm_up = warm_up
        self._on_death = on_death or (lambda: None)
        self._warmed = threading.Event()
        self._warm_up_error: BaseException | None = None
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._arriving = 0
        self._closing = False
        self._batch_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        """Start the inference thread; return once it has run `warm_up` (raising its error).

        Warm-up runs on the inference thread, the one thread that ever runs the model, so
        whatever per-thread state the runtime keeps is built before the first request.
        """
        self._thread.start()
        self._warmed.wait()
        if self._warm_up_error is not None:
            raise self._warm_up_error

    @property
    def alive(self) -> bool:
        """Tell whether the inference thread runs and takes new work."""
        return self._thread.is_alive() and not self._closing

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait for the inference thread to end; tell whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued, and stop the inference thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @contextmanager
    def arrival(self) -> Iterator[Arrival]:
        """Announce a request that will submit images soon, so a forming batch waits for it."""
        arrival = self.announce()
        try:
            yield arrival
        finally:
            arrival.leave()

    def announce(self) -> Arrival:
        """Count a request on its way (a worker decoding its upload) until it submits or
        `leave`s: a forming batch waits for it, up to max_delay_s."""
        with self._cond:
            self._arriving += 1
        return Arrival(self)

    def wait_queued(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` images are queued; tell whether they are."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= count, timeout)

    def estimated_wait_s(self) -> float:
        """Estimate how long the images queued now wait for their batches to run."""
        with self._cond:
            return self._estimate_locked(len(self._queue))

    def submit(
        self, inputs: Sequence[np.ndarray], deadline: float, arrival: Arrival | None = None
    ) -> list[Future]:
        """Queue the inputs; return one future per input, or raise Overloaded at once."""
        now = time.monotonic()
        with self._cond:
            if arrival is not None:
                # In the same critical section as the enqueue, so a forming batch that stops
                # waiting for this request already finds its images in the queue.
                arrival.leave_locked()
            if not self.alive:
                raise ModelNotReady("the inference thread is not running")
            if len(self._queue) + len(inputs) > self.max_queue:
                raise Overloaded(
                    f"the batch queue is full ({len(self._queue)} of {self.max_queue} images)",
                    retry_after_s=self._retry_after_locked(),
                )
            wait = self._estimate_locked(len(self._queue) + len(inputs))
            if now + wait > deadline:
                raise Overloaded(
                    f"the queue's estimated wait ({wait:.3f}s) exceeds the request deadline",
                    retry_after_s=self._retry_after_locked(),
                )
            items = [_Item(array, deadline, now) for array in inputs]
            self._queue.extend(items)
            self.metrics.queue_depth.inc(len(items))
            self._cond.notify_all()
        return [item.future for item in items]

    def _estimate_locked(self, queued: int) -> float:
        return math.ceil(queued / self.max_batch_size) * self._batch_seconds

    def _retry_after_locked(self) -> int:
        return max(1, math.ceil(self._estimate_locked(len(self._queue))))

    def _run(self) -> None:
        try:
            if self._warm_up is not None:
                self._warm_up()
        except BaseException as exc:
            self._warm_up_error = exc
            with self._cond:
                self._closing = True
            return
        finally:
            self._warmed.set()
        try:
            while (batch := self._next_batch()) is not None:
                self._execute(batch)
        except BaseException:
            log.critical("the inference thread died; readiness now reports 503", exc_info=True)
        finally:
            self._fail_queued(ModelNotReady("the inference thread stopped"))

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            window_end = self._queue[0].enqueued_at + self.max_delay_s
            while len(self._queue) < self.max_batch_size and self._arriving and not self._closing:
                remaining = window_end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(self.max_batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            self.metrics.queue_depth.dec(count)
        return batch

    def _execute(self, batch: list[_Item]) -> None:
        started = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue
            if item.deadline < started:
                item.future.set_exception(DeadlineExceeded("the request timed out in the queue"))
                continue
            self.metrics.queue_wait.observe(started - item.enqueued_at)
            live.append(item)
        if not live:
            return
        try:
            outputs = self._predict_batch(np.stack([item.array for item in live]))
        except BaseException as exc:
            log.exception("forward pass failed for a batch of %d images", len(live))
            fatal = not isinstance(exc, Exception)
            if fatal:
                # Not alive from here on, and said so before the batch's answers go out.
                with self._cond:
                    self._closing = True
                self._on_death()
            for item in live:
                item.future.set_exception(InferenceFailed("the model failed on this batch"))
            if fatal:
                raise  # the thread ends; readiness reports it
            return
        elapsed = time.monotonic() - started
        with self._cond:
            weight = _EWMA_WEIGHT if self._batch_seconds else 1.0
            self._batch_seconds += weight * (elapsed - self._batch_seconds)
            self.metrics.estimated_wait.set(self._estimate_locked(len(self._queue)))
        self.metrics.inference.observe(elapsed)
        self.metrics.batch_size.observe(len(live))
        self.metrics.images.inc(len(live))
        self.metrics.record_outputs(outputs[: len(live)])
        for item, output in zip(live, outputs, strict=True):
            item.future.set_result(output)

    def _fail_queued(self, error: Exception) -> None:
        with self._cond:
            self._closing = True
            items = list(self._queue)
            self._queue.clear()
            self.metrics.queue_depth.dec(len(items))
        for item in items:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(error)


class Arrival:
    """A request on its way into the batcher; see `Batcher.arrival`."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self._arrived = False

    def leave(self) -> None:
        """Stop counting as on its way (idempotent)."""
        with self._batcher._cond:
            self.leave_locked()

    def leave_locked(self) -> None:
        """Do what `leave` does, with the batcher's lock already held."""
        if not self._arrived:
            self._arrived = True
            self._batcher._arriving -= 1
            self._batcher._cond.notify_all()
