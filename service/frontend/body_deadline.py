"""Bound the time a request body may take to arrive, so a slow client cannot hold a thread.

The service's worker (service/frontend/worker.py) reads bodies whole before a thread runs, except
where it hands a request over early (a body over the limit, framing the parser judges).
There gunicorn reads the rest with blocking `recv` calls and no timeout, and a socket
timeout would not help: it bounds each `recv`, and a client sending a byte every
half second satisfies every one of them. Instead one watchdog thread per process shuts the
read side of any socket whose body is still being read at its deadline; the blocked read
then returns, and the request answers 408.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from typing import Any

from gunicorn.http.errors import ParseException

from service.errors import MalformedBody, RequestTimeout


class _Watch:
    __slots__ = ("active", "deadline", "fired", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.active = True
        self.fired = False


class SocketWatchdog:
    """Shut the read side of sockets still watched at their deadline (one thread).

    Every request gets the same timeout, so deadlines arrive in order and a FIFO queue serves
    as the timer list; finished entries are dropped from its front as they are released.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[_Watch] = deque()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> _Watch:
        """Start watching `sock` until `deadline` (monotonic seconds)."""
        entry = _Watch(sock, deadline)
        with self._cond:
            if self._thread is None:
                # Started on first use, so in the worker after gunicorn's fork.
                self._thread = threading.Thread(target=self._run, name="body-deadline")
                self._thread.daemon = True
                self._thread.start()
            self._queue.append(entry)
            if len(self._queue) == 1:
                self._cond.notify()
        return entry

    def release(self, entry: _Watch) -> bool:
        """Stop watching; tell whether the deadline had already fired."""
        with self._cond:
            entry.active = False
            self._drop_released()
            return entry.fired

    def _drop_released(self) -> None:
        while self._queue and not self._queue[0].active:
            self._queue.popleft()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._drop_released()
                if not self._queue:
                    self._cond.wait()
                    continue
                entry = self._queue[0]
                wait = entry.deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                self._queue.popleft()
                entry.fired = True
            # OSError: already closed by the client or the worker.
            with contextlib.suppress(OSError):
                entry.sock.shutdown(socket.SHUT_RD)


WATCHDOG = SocketWatchdog()


class BodyWithDeadline:
    """The request body stream, raising RequestTimeout once the request's deadline passes,
    and MalformedBody where gunicorn finds the body's framing broken."""

    def __init__(self, stream: Any, sock: socket.socket | None, deadline: float) -> None:
        """Wrap `stream`; `sock` None: the body is already buffered, so nothing can block."""
        self._stream = stream
        self._sock = sock
        self._deadline = deadline

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped stream, within the deadline."""
        return self._within_deadline(self._stream.read, size)

    def readline(self, size: int = -1) -> bytes:
        """Read a line like the wrapped stream, within the deadline."""
        return self._within_deadline(self._stream.readline, size)

    def _within_deadline(self, method: Any, size: int) -> bytes:
        if time.monotonic() >= self._deadline:
            raise RequestTimeout("the request body did not arrive in time")
        entry = WATCHDOG.watch(self._sock, self._deadline) if self._sock is not None else None
        try:
            data = method(size)
        except Exception as exc:
            if entry is not None and WATCHDOG.release(entry):
                raise RequestTimeout("the request body did not arrive in time") from None
            if isinstance(exc, ParseException):
                # gunicorn decodes the chunked framing as the app reads: a fault found there
                # is the client's (gunicorn then closes the connection, whose rest it cannot
                # frame as a next request).
                raise MalformedBody(f"malformed request body: {exc}") from None
            raise
        if entry is not None and WATCHDOG.release(entry):
            raise RequestTimeout("the request body did not arrive in time")
        return data
