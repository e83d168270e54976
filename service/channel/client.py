"""The front end's side of the channel: one client per worker, a socket per thread and runner.

Each request thread sends on its own ZeroMQ DEALER socket and waits on it for its answer,
so no thread hands a request to another. While it waits it watches the runner's slot: a
runner that stops (killed, crashed) fails the requests it held at once with a 503, and a
late answer to a request already given up on is recognised by its seq and dropped.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from typing import Any

import numpy as np
import zmq

from service.channel import wire
from service.channel.slots import SlotTable
from service.errors import DeadlineExceeded, ModelNotReady

# How often a waiting thread looks at its runner's slot: the longest a request waits to learn
# that its runner has died.
WATCH_S = 0.05
# The longest a request waits for its thread's socket to connect to a runner.
CONNECT_S = 1.0


def runner_address(server_id: str, index: int) -> str:
    """Return runner `index`'s address: a socket in Linux's abstract namespace, no file."""
    return f"ipc://@cnn-serving-{server_id}-runner-{index}"


class RunnerClient:
    """Sends requests to the runners of one server and waits for their answers."""

    def __init__(self, server_id: str, slots: SlotTable) -> None:
        """Talk to the runners of `server_id`, watching their `slots`; make no socket yet."""
        self.server_id = server_id
        self.slots = slots
        self._context: zmq.Context | None = None
        self._context_lock = threading.Lock()
        self._local = threading.local()
        self._seq = itertools.count(1)

    def predict(
        self,
        index: int,
        tensor: np.ndarray,
        *,
        model: str,
        version: str,
        deadline: float,
        wait_until: float,
        request_id: str = "",
        announced: int = 0,
    ) -> np.ndarray:
        """Return runner `index`'s outputs for `tensor`, waiting for them until `wait_until`
        (`announced`: the seq `announce` gave, on this thread, for this request)."""
        return self._tensor_call(
            wire.PREDICT, index, tensor, model, version, deadline, wait_until, request_id, announced
        )

    def explain(
        self,
        index: int,
        tensor: np.ndarray,
        *,
        model: str,
        version: str,
        deadline: float,
        wait_until: float,
        request_id: str = "",
    ) -> wire.Explanation:
        """Return runner `index`'s Grad-CAM explanation of `tensor`'s images."""
        return self._tensor_call(
            wire.EXPLAIN, index, tensor, model, version, deadline, wait_until, request_id
        )

    def _tensor_call(
        self,
        kind: str,
        index: int,
        tensor: np.ndarray,
        model: str,
        version: str,
        deadline: float,
        wait_until: float,
        request_id: str,
        announced: int = 0,
    ) -> Any:
        seq = next(self._seq)
        frames = wire.predict_request(
            seq, request_id, deadline, model, version, tensor, announced, kind
        )
        return self._call(index, seq, frames, wait_until)

    def announce(self, index: int, *, model: str, version: str, deadline: float) -> int:
        """Tell runner `index` that a request for `model` `version` is on its way, so that a
        batch forming meanwhile waits for it; return the seq to name in `predict` (0: the
        runner could not be told, nothing to name)."""
        seq = next(self._seq)
        return (
            seq if self._notify(index, wire.arriving_notice(seq, deadline, model, version)) else 0
        )

    def withdraw(self, index: int, announced: int) -> None:
        """Tell runner `index` that the request `announce`d as `announced` will not come."""
        self._notify(index, wire.left_notice(announced))

    def _notify(self, index: int, frames: wire.Frames) -> bool:
        try:
            self._socket(index).send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False  # not connected (yet): nobody waits for what was not announced
        return True

    def catalogue(self, index: int, timeout_s: float) -> dict[str, Any]:
        """Return what runner `index` serves."""
        seq = next(self._seq)
        return self._call(index, seq, wire.catalogue_request(seq), time.monotonic() + timeout_s)

    def close(self) -> None:
        """Close every socket of this client, in every thread."""
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    def _call(self, index: int, seq: int, frames: wire.Frames, wait_until: float) -> Any:
        incarnation = self.slots.incarnation(index)
        if not self.slots.running(index):
            raise ModelNotReady(f"runner {index} is not running; it is being restarted")
        sock = self._socket(index)
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # Not connected yet (a new socket, or a runner restarting): wait a moment for it.
            connect_s = max(0.0, min(CONNECT_S, wait_until - time.monotonic()))
            if not sock.poll(math.ceil(connect_s * 1000.0), zmq.POLLOUT):
                raise ModelNotReady(f"runner {index} does not take requests yet") from None
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        while True:
            left = wait_until - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"runner {index}: the forward pass did not finish in time")
            if sock.poll(math.ceil(min(left, WATCH_S) * 1000.0)):
                answer = sock.recv_multipart(copy=False)
                answered, header = wire.answer_seq(answer)
                if answered == seq:
                    return wire.read_answer(header, answer)
                continue  # the answer to a request this thread gave up on
            if self.slots.incarnation(index) != incarnation or not self.slots.running(index):
                raise ModelNotReady(f"runner {index} stopped before it answered; ask again")

    def _socket(self, index: int) -> zmq.Socket:
        sockets = getattr(self._local, "sockets", None)
        if sockets is None:
            sockets = self._local.sockets = _ThreadSockets()
        sock = sockets.get(index)
        if sock is None:
            sock = self._new_context_socket()
            sock.connect(runner_address(self.server_id, index))
            sockets[index] = sock
        return sock

    def _new_context_socket(self) -> zmq.Socket:
        with self._context_lock:
            if self._context is None:
                self._context = zmq.Context()  # made in the worker, after gunicorn's fork
            sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue a message only to a connected runner: with none, a send fails at once (503)
        # instead of waiting for one to start.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        return sock


class _ThreadSockets(dict[int, zmq.Socket]):
    """One thread's sockets, by runner: closed when the thread ends and drops them."""

    def __del__(self) -> None:
        for sock in self.values():
            sock.close(linger=0)
