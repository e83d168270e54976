"""What a runner does with the requests of every worker: the channel's handler.

A prediction goes to the batcher of the version it names (retired or not: it resolved that
version before the retirement), and is answered once all its images are run, or with the
first error. Admission is decided here, where the queue is. At its deadline, a request's
images still queued are cancelled and it is answered 504; images already in a running batch
are waited for (the worker waits that batch's grace too).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from service.channel import wire
from service.channel.server import Respond
from service.channel.slots import SlotTable
from service.errors import DeadlineExceeded, InferenceFailed, ServiceError
from service.registry import Models, VersionStatus
from service.runner.batching import Arrival
from service.runner.explainer import Explainer
from service.runner.inference import ModelVersion
from service.runner.reloader import ModelManager

log = logging.getLogger(__name__)


class RunnerCore:
    """Predictions into the batchers of one runner's versions; its catalogue out."""

    def __init__(
        self,
        models: Models[ModelVersion],
        manager: ModelManager,
        slots: SlotTable,
        index: int,
        explainer: Explainer,
    ):
        """Serve `models`, kept by `manager`, as runner `index` of `slots`; explanations on
        `explainer`'s threads."""
        self.models = models
        self.explainer = explainer
        self.manager = manager
        self.slots = slots
        self.index = index
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._order = itertools.count()
        # Requests announced and not yet come, by (worker socket, seq), with their deadline
        # heap: one whose worker died, or never sent it, stops being waited for then.
        self._arrivals: dict[tuple[bytes, int], Arrival] = {}
        self._arrival_deadlines: list[tuple[float, bytes, int]] = []
        self._held = 0
        self._held_lock = threading.Lock()

    def predict(self, sender: bytes, request: wire.Request, respond: Respond) -> None:
        """Queue the request's images in its version's batcher; answer once they are run."""
        assert request.tensor is not None
        arrival = self._arrivals.pop((sender, request.announced), None)
        try:
            if request.deadline <= time.monotonic():
                raise DeadlineExceeded("the request's deadline passed before it reached the runner")
            served: ModelVersion = self.models.serving(request.model, request.version)
            futures = served.submit(request.tensor, request.deadline, arrival)
        finally:
            if arrival is not None:
                arrival.leave()  # at once if submit did not take it
        served.hold()
        self._count_held(len(futures))
        pending = _Pending(request, served, futures, respond, self._count_held)
        heapq.heappush(self._deadlines, (request.deadline, next(self._order), pending))
        pending.watch()

    def explain(self, sender: bytes, request: wire.Request, respond: Respond) -> None:
        """Explain the request's images on the explainer's threads; answer once done."""
        assert request.tensor is not None
        tensor = request.tensor
        if request.deadline <= time.monotonic():
            raise DeadlineExceeded("the request's deadline passed before it reached the runner")
        served: ModelVersion = self.models.serving(request.model, request.version)
        future = self.explainer.submit(lambda: served.explain(tensor), request.deadline)
        served.hold()

        def answer(done: Future) -> None:
            served.release()
            error = done.exception()
            if error is None:
                respond(wire.explanation_answer(request.seq, done.result()))
                return
            respond(_failed("explanation", request, _typed(error), error))

        future.add_done_callback(answer)

    def arriving(self, sender: bytes, request: wire.Request) -> None:
        """Have the version's forming batch wait for a request whose upload is decoding."""
        served: ModelVersion = self.models.serving(request.model, request.version)
        self._arrivals[(sender, request.seq)] = served.batcher.announce()
        heapq.heappush(self._arrival_deadlines, (request.deadline, sender, request.seq))

    def left(self, sender: bytes, request: wire.Request) -> None:
        """Stop waiting for an announced request that will not come (its upload was bad)."""
        arrival = self._arrivals.pop((sender, request.seq), None)
        if arrival is not None:
            arrival.leave()

    def expire(self, now: float) -> float | None:
        """Cancel the queued images of requests past their deadline, stop waiting for those
        announced and not come by theirs; return the next deadline."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, pending = heapq.heappop(self._deadlines)
            pending.cancel()
        while self._deadlines and self._deadlines[0][2].answered:
            heapq.heappop(self._deadlines)
        while self._arrival_deadlines and self._arrival_deadlines[0][0] <= now:
            _, sender, seq = heapq.heappop(self._arrival_deadlines)
            arrival = self._arrivals.pop((sender, seq), None)
            if arrival is not None:
                arrival.leave()
        next_deadlines = [heap[0][0] for heap in (self._deadlines, self._arrival_deadlines) if heap]
        return min(next_deadlines, default=None)

    def catalogue(self) -> dict[str, Any]:
        """Return what this runner serves, for the workers."""
        manager = self.manager
        return {
            "phase": manager.phase.value,
            "alive": manager.alive,
            "failure": manager.failure,
            "unready_reason": self.models.unready_reason,
            "versions": [_row(status) for status in self.models.statuses()],
            "labels": {name: self.models.labels(name) for name in self.models.names()},
        }

    def _count_held(self, images: int) -> None:
        with self._held_lock:
            self._held += images
            self.slots.set_held(self.index, self._held)


def _row(status: VersionStatus) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": status.model,
        "version": status.version,
        "state": status.state.value,
        "error": status.error,
    }
    served = status.served
    if served is not None:
        info = served.info
        spec = info.spec
        row["alive"] = served.alive
        row["info"] = {
            "labels": list(info.labels),
            "shape": list(spec.shape),
            "rescale": spec.rescale,
            "offset": spec.offset,
            "device": info.device,
            "batch_sizes": list(getattr(served.classifier, "batch_sizes", ())),
        }
    return row


class _Pending:
    """One request's images in the batcher, until all are answered or one fails."""

    def __init__(
        self,
        request: wire.Request,
        served: ModelVersion,
        futures: list[Future],
        respond: Respond,
        count_held: Any,
    ) -> None:
        self.request = request
        self.served = served
        self.futures = futures
        self.respond = respond
        self.count_held = count_held
        self.answered = False
        self._left = len(futures)
        self._lock = threading.Lock()

    def watch(self) -> None:
        """Answer once every future is done (callbacks run in the batcher's thread)."""
        for future in self.futures:
            future.add_done_callback(self._done)

    def cancel(self) -> None:
        """Cancel the images not yet running: the request has passed its deadline."""
        for future in self.futures:
            future.cancel()

    def _done(self, future: Future) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
            error = None if self.answered else _failure(future)
            answer_now = not self.answered and (error is not None or last)
            self.answered = self.answered or answer_now
        if last:
            self.count_held(-len(self.futures))
            self.served.release()
        if not answer_now:
            return
        seq = self.request.seq
        if error is None:
            outputs = np.stack([f.result() for f in self.futures]).astype(np.float32, copy=False)
            self.respond(wire.outputs_answer(seq, outputs))
            return
        self.respond(_failed("prediction", self.request, error, error.message))


def _failed(what: str, request: wire.Request, error: ServiceError, cause: object) -> wire.Frames:
    """Return the error answer to `request`, logging a failure of the runner's own (not a
    timeout) with its `cause`."""
    if error.status >= 500 and not isinstance(error, DeadlineExceeded):
        log.error(
            "%s failed: %s",
            what,
            cause,
            extra={"request_id": request.request_id, "code": error.code},
        )
    return wire.error_answer(request.seq, error)


def _failure(future: Future) -> ServiceError | None:
    if future.cancelled():
        return DeadlineExceeded("the request timed out waiting in the batch queue")
    raised = future.exception()
    return _typed(raised) if raised is not None else None


def _typed(error: BaseException) -> ServiceError:
    if isinstance(error, ServiceError):
        return error
    return InferenceFailed("the model failed on this batch")
