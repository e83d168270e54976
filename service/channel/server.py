"""The runner's side of the channel: one loop that reads every worker's requests and answers.

One thread owns the ROUTER socket. Requests are handed to the runner's handler, which answers
a catalogue at once and a prediction later, from the batcher's thread: those answers reach
the loop through a queue and a pipe that wakes it. A worker that has gone away is simply
not answered (ROUTER drops what it cannot route), so it never holds the runner up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import zmq

from service.channel import wire
from service.errors import ServiceError

log = logging.getLogger(__name__)

# The requests that get an answer (the others are notices).
ANSWERED = (wire.CATALOGUE, wire.PREDICT, wire.EXPLAIN)
# Answer a request: its frames, sent to the worker that asked.
Respond = Callable[[wire.Frames], None]


class Handler(Protocol):
    """What the runner does with requests (service.runner.core)."""

    def predict(self, sender: bytes, request: wire.Request, respond: Respond) -> None:
        """Take a prediction from `sender`, to be answered through `respond`, now or later."""

    def explain(self, sender: bytes, request: wire.Request, respond: Respond) -> None:
        """Take an explanation request from `sender`, to be answered through `respond`."""

    def arriving(self, sender: bytes, request: wire.Request) -> None:
        """Note a request of `sender` on its way (no answer)."""

    def left(self, sender: bytes, request: wire.Request) -> None:
        """Forget a request of `sender` that will not come (no answer)."""

    def catalogue(self) -> dict:
        """Return what the runner serves now."""

    def expire(self, now: float) -> float | None:
        """Give up on requests past their deadline; return the next deadline, if any."""


class RunnerServer:
    """The ROUTER socket at `address` and the loop that serves it."""

    def __init__(self, address: str, handler: Handler) -> None:
        """Bind `address` (in this thread) and serve `handler` from `serve`."""
        self.handler = handler
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._answers: deque[tuple[bytes, wire.Frames]] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._stopping = threading.Event()
        self._closed = False

    def serve(self) -> None:
        """Answer requests until `stop`; send every answer queued before it."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        next_deadline: float | None = None
        try:
            while not self._stopping.is_set():
                timeout_ms = 1000.0
                if next_deadline is not None:
                    timeout_ms = max(0.0, min(timeout_ms, (next_deadline - time.monotonic()) * 1e3))
                ready = dict(poller.poll(math.ceil(timeout_ms)))
                if self._wake_read in ready:
                    os.read(self._wake_read, 4096)
                self._send_answers()
                if self._socket in ready:
                    self._receive()
                next_deadline = self.handler.expire(time.monotonic())
            self._send_answers()
        finally:
            self._closed = True
            self._socket.close(linger=0)
            self._context.term()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def stop(self) -> None:
        """Make `serve` return after sending the answers queued so far."""
        self._stopping.set()
        self._wake()

    def _receive(self) -> None:
        # Everything waiting, not one message per poll: a burst is read in one turn.
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, body = frames[0].bytes, frames[1:]
            self._handle(identity, body)

    def _handle(self, identity: bytes, body: wire.Frames) -> None:
        try:
            request = wire.read_request(body)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("a malformed message on the channel was dropped: %s", exc)
            return

        def respond(frames: wire.Frames) -> None:
            self._answers.append((identity, frames))
            self._wake()

        try:
            if request.kind == wire.CATALOGUE:
                self._send(identity, wire.catalogue_answer(request.seq, self.handler.catalogue()))
            elif request.kind == wire.PREDICT:
                self.handler.predict(identity, request, respond)
            elif request.kind == wire.EXPLAIN:
                self.handler.explain(identity, request, respond)
            elif request.kind == wire.ARRIVING:
                self.handler.arriving(identity, request)
            else:
                self.handler.left(identity, request)
        except ServiceError as error:
            if request.kind in ANSWERED:  # notices get no answer
                self._send(identity, wire.error_answer(request.seq, error))
        except Exception:
            # A fault of the runner's own: this request fails, the loop goes on.
            log.exception("the runner failed on a request", extra={"kind": request.kind})
            if request.kind in ANSWERED:
                failure = ServiceError(f"internal error (request id {request.request_id})")
                self._send(identity, wire.error_answer(request.seq, failure))

    def _send_answers(self) -> None:
        while self._answers:
            identity, frames = self._answers.popleft()
            self._send(identity, frames)

    def _send(self, identity: bytes, frames: wire.Frames) -> None:
        try:
            self._socket.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("a worker's queue is full; its answer was dropped")

    def _wake(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(BlockingIOError):  # a full pipe: the loop is awake already
            os.write(self._wake_write, b"w")
