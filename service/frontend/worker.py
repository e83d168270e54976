"""The gunicorn worker: its event loop reads each request whole before a thread runs it.

gunicorn's gthread worker gives a connection to a request thread as soon as its first bytes
arrive, and the thread then blocks reading the rest of the headers and the body: a few dozen
clients trickling a byte at a time hold every thread, and nobody else is answered. This
worker reads the request line, the headers and the body in the main loop instead (with the
non-blocking sockets and the poller gthread already has), and gives a thread only a request
that has arrived whole. A thread is never held by the network, so slow clients cost a file
descriptor and a buffer each, not a thread.

Each request must arrive whole within REQUEST_TIMEOUT_S of its first byte, which is also
where its one deadline starts (the app reads it from the environ); one that does not gets a
JSON 408 and a close. A new connection that sends nothing is closed after that long, an idle
kept-alive one after the keep-alive timeout.

Where the bytes read so far let gunicorn's own parser reach its verdict (a bad header, a
Content-Length over the body limit, broken chunked framing), the request goes to a thread at
once: the parser answers from what is buffered, and any body read past it is bounded by the
app's body deadline (service.frontend.body_deadline).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import threading
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from service.frontend.framing import Framing, RequestScan
from service.settings import Settings

# One recv: large enough that a 16 MiB upload takes few calls, small enough that one
# connection's upload does not hold the loop (at most READ_PER_EVENT per readiness event).
RECV_BYTES = 256 * 1024
READ_PER_EVENT = 1024 * 1024
# A connection always may buffer this much, so small requests go on while big partial
# uploads wait for the per-worker buffer budget to free.
ALWAYS_BUFFERED = 64 * 1024
# After an error answer, the most read and dropped while the client stops sending.
LINGER_BYTES = 1024 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Conn(TConn):
    """A connection, with the request arriving on it while the event loop reads it."""

    def __init__(self, cfg: Any, sock: Any, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.arriving: bytearray | None = None  # set while the event loop reads a request
        self.scan: RequestScan | None = None
        self.arrived_at: float | None = None  # monotonic time of the request's first byte
        self.deadline = 0.0
        self.deadline_key = 0
        self.registered = False
        self.arrived: bytes | None = None  # a request read whole, for the thread to parse
        self.body_buffered = False  # whether `arrived` holds the whole body, not only a start
        self.sent_continue = False
        self.linger_left: int | None = None  # bytes still read and dropped after an error


class ArrivalWorker(ThreadWorker):
    """gthread, but a request thread only ever gets a request that arrived whole."""

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Refuse TLS and HTTP/2: the event loop reads plain HTTP/1.1 bytes."""
        super().check_config(cfg, log)
        if cfg.is_ssl or "h2" in cfg.http_protocols:
            raise SystemExit(
                "cnn-serve: error: the service speaks plain HTTP/1.1; terminate TLS and HTTP/2"
                " in front of it (an ingress or a load balancer)"
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = Settings.from_env()
        self.arrival_timeout_s = settings.request_timeout_s
        self.body_limit = settings.max_body_bytes
        # The most a worker buffers for requests still arriving: a few whole bodies.
        self.buffer_budget = 4 * settings.max_body_bytes
        self.buffered = 0
        self.reading = 0  # connections whose request is arriving
        self.deadlines: list[tuple[float, int, _Conn]] = []
        self.deadline_keys = itertools.count(1)
        self.paused: list[_Conn] = []
        self.stopping_capped = False
        self.local = threading.local()

    def init_process(self) -> None:
        """Import the metrics after the fork, in the worker (never in gunicorn's master)."""
        from service import metrics

        self.metrics = metrics
        super().init_process()

    # --- the app sees when its request began to arrive -------------------------------------

    def load_wsgi(self) -> None:
        """Load the app, and stamp each request's environ with the time it began to arrive."""
        super().load_wsgi()
        from service.frontend.app import ARRIVED_AT, BODY_BUFFERED

        local = self.local
        app = self.wsgi.wsgi_app

        def stamped(environ: dict[str, Any], start_response: Any) -> Any:
            arrived_at = getattr(local, "arrived_at", None)
            if arrived_at is not None:
                environ[ARRIVED_AT] = arrived_at
                environ[BODY_BUFFERED] = local.body_buffered
            return app(environ, start_response)

        self.wsgi.wsgi_app = stamped

    # --- connections enter the event loop until their request has arrived ------------------

    def accept(self, listener: Any) -> None:
        """Accept a connection and read its first request in the event loop."""
        try:
            client_sock, client_addr = listener.accept()
        except (BlockingIOError, ConnectionAbortedError, InterruptedError):
            return
        self.nr_conns += 1
        conn = _Conn(self.cfg, client_sock, client_addr, listener.getsockname())
        self._await_request(conn, idle_s=self.arrival_timeout_s)

    def enqueue_req(self, conn: Any) -> None:
        """Give a thread a request that arrived whole; await any other one first.

        gthread calls this for a kept-alive connection that became readable, and for one
        whose last request left bytes of the next one read ahead.
        """
        if conn.arrived is not None:
            super().enqueue_req(conn)
        else:
            self._await_request(conn, idle_s=float(self.cfg.keepalive))

    def _await_request(self, conn: _Conn, idle_s: float) -> None:
        now = time.monotonic()
        carried = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.arriving = bytearray(carried)
        conn.scan = RequestScan(
            self.cfg.limit_request_line,
            self.cfg.limit_request_line
            + self.cfg.limit_request_fields * (self.cfg.limit_request_field_size + 2)
            + 4,
            self.body_limit,
            self.cfg.limit_request_field_size,
        )
        conn.arrived_at = now if carried else None
        conn.sent_continue = False
        conn.sock.setblocking(False)
        self.buffered += len(carried)
        self.reading += 1
        self.metrics.REQUESTS_ARRIVING.set(self.reading)
        self._set_deadline(conn, now + (self.arrival_timeout_s if carried else idle_s))
        # Usually the request is already there (a readable kept-alive connection, a client
        # that sent at once): read it now rather than after one more turn of the poller.
        if carried and self._judge(conn):
            return  # a pipelined request, already whole
        if not self._read(conn, now):
            self._listen(conn)

    def _set_deadline(self, conn: _Conn, deadline: float) -> None:
        conn.deadline = deadline
        conn.deadline_key = next(self.deadline_keys)
        heapq.heappush(self.deadlines, (deadline, conn.deadline_key, conn))

    def _listen(self, conn: _Conn) -> None:
        if not conn.registered:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, conn))
            conn.registered = True

    def _unlisten(self, conn: _Conn) -> None:
        if conn.registered:
            self.poller.unregister(conn.sock)
            conn.registered = False

    def _readable(self, conn: _Conn, sock: Any) -> None:
        if conn.arriving is not None:
            self._read(conn, time.monotonic())

    def _read(self, conn: _Conn, now: float) -> bool:
        """Read what has come; return whether the connection left the event loop."""
        assert conn.arriving is not None and conn.scan is not None
        taken = 0
        while taken < READ_PER_EVENT:
            data = _recv(conn.sock)
            if data is None:
                break
            if not data:
                if conn.arriving:
                    # Half a request, then the client's end of the stream: the parser finds
                    # the request truncated (and the socket at its end, so nothing blocks).
                    self._hand_to_thread(conn, body_buffered=False)
                else:  # the client went away between requests: nothing to answer
                    self._drop(conn)
                return True
            if conn.arrived_at is None:
                conn.arrived_at = now
                self._set_deadline(conn, now + self.arrival_timeout_s)
            conn.arriving += data
            self.buffered += len(data)
            taken += len(data)
            if self._judge(conn):
                return True
            if len(data) < RECV_BYTES:
                break  # the socket is drained for now
        if conn.scan.expects_continue and conn.scan.headers_end >= 0 and not conn.sent_continue:
            # The client waits for this before it sends the body; gunicorn would send it
            # only once a thread parsed the headers, which here is after the body.
            conn.sent_continue = True
            self._send_quietly(conn, CONTINUE)
        if self.buffered > self.buffer_budget and len(conn.arriving) > ALWAYS_BUFFERED:
            # Over the budget: this big upload waits (TCP pushes back on its client) until
            # other requests leave the loop; its deadline still runs.
            self._unlisten(conn)
            self.paused.append(conn)
        return False

    def _judge(self, conn: _Conn) -> bool:
        """Act on what the bytes so far frame; return whether the connection left the loop."""
        assert conn.arriving is not None and conn.scan is not None
        framing = conn.scan.scan(conn.arriving)
        if framing is Framing.INCOMPLETE:
            return False
        if framing is Framing.HEADERS_TOO_LARGE:
            limit = conn.scan.header_limit
            message = f"the request line and headers are over the limit of {limit} bytes"
            self._refuse(conn, 431, "Request Header Fields Too Large", message)
        else:
            self._hand_to_thread(conn, body_buffered=framing is Framing.COMPLETE)
        return True

    def _hand_to_thread(self, conn: _Conn, body_buffered: bool) -> None:
        self._leave_loop(conn)
        conn.body_buffered = body_buffered
        conn.arrived = bytes(conn.arriving or b"")
        conn.arriving = None
        conn.data_ready = True
        if conn.arrived_at is not None:
            self.metrics.REQUEST_ARRIVAL.observe(time.monotonic() - conn.arrived_at)
        self.enqueue_req(conn)

    def _leave_loop(self, conn: _Conn) -> None:
        self._unlisten(conn)
        self.reading -= 1
        self.metrics.REQUESTS_ARRIVING.set(self.reading)
        self.buffered -= len(conn.arriving or b"")
        conn.deadline_key = 0
        while self.paused and self.buffered <= self.buffer_budget:
            waiting = self.paused.pop(0)
            if waiting.arriving is not None:
                self._listen(waiting)

    def _drop(self, conn: _Conn) -> None:
        self._leave_loop(conn)
        conn.arriving = None
        self.nr_conns -= 1
        conn.close()

    def _send_quietly(self, conn: _Conn, data: bytes) -> None:
        # A few hundred bytes into an empty send buffer: they go at once, or not at all.
        with contextlib.suppress(OSError):
            conn.sock.send(data)

    # --- deadlines ---------------------------------------------------------------------------

    def murder_pending(self) -> None:
        """gthread's per-turn timeout pass: also cut off requests that did not arrive in time."""
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and not self.stopping_capped:
            # Stopping: connections with no request under way close soon, as gthread does
            # with kept-alive ones; requests already arriving keep their deadline.
            self.stopping_capped = True
            for _, key, conn in list(self.deadlines):
                if key == conn.deadline_key and conn.arrived_at is None:
                    self._set_deadline(conn, min(conn.deadline, now + STOP_KEEPALIVE_LINGER))
        while self.deadlines and self.deadlines[0][0] <= now:
            _, key, conn = heapq.heappop(self.deadlines)
            if key != conn.deadline_key:
                continue  # superseded, or the request left the loop
            if conn.linger_left is not None:
                self._end_linger(conn)
            elif conn.arrived_at is None:
                self._drop(conn)  # no request had begun: nothing to answer
            else:
                message = f"the request did not arrive whole within {self.arrival_timeout_s:g} s"
                self._refuse(conn, 408, "Request Timeout", message)

    def _refuse(self, conn: _Conn, status: int, reason: str, message: str) -> None:
        """Answer a JSON error from the event loop, and close the connection."""
        from service.frontend.raw_errors import error_bytes, error_code

        code = error_code(reason)
        self.metrics.ERRORS.labels(code, self.metrics.HTTP).inc()
        self._send_quietly(conn, error_bytes(status, reason, code, message))
        # Close as gunicorn does (RFC 9112 9.6), but without blocking the loop: send FIN, and
        # read what the client still sends for a moment, since closing with unread bytes
        # sends a RST that can destroy the answer before the client reads it.
        self._leave_loop(conn)
        conn.arriving = None
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.linger_left = LINGER_BYTES
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._linger, conn))
        conn.registered = True
        self._set_deadline(conn, time.monotonic() + STOP_KEEPALIVE_LINGER)

    def _linger(self, conn: _Conn, sock: Any = None) -> None:
        data = _recv(conn.sock)
        if data is None:
            return
        conn.linger_left = (conn.linger_left or 0) - len(data)
        if not data or conn.linger_left <= 0:
            self._end_linger(conn)

    def _end_linger(self, conn: _Conn) -> None:
        self._unlisten(conn)
        conn.deadline_key = 0
        conn.linger_left = None
        self.nr_conns -= 1
        conn.close()

    # --- in the request thread ---------------------------------------------------------------

    def handle(self, conn: Any) -> Any:
        """Parse the request from the bytes the event loop read, then serve it as gthread does."""
        if conn.arrived is not None:
            conn.init()
            conn.parser.unreader.unread(conn.arrived)
            conn.arrived = None
        return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        """Serve one request, with its arrival time for the app and no second 100 Continue."""
        self.local.arrived_at = conn.arrived_at
        self.local.body_buffered = conn.body_buffered
        if conn.sent_continue:
            req._expected_100_continue = False  # the event loop sent it
        return super().handle_request(req, conn)


def _recv(sock: socket.socket) -> bytes | None:
    """Return what a non-blocking socket has: None if nothing yet, b"" at its end (or error)."""
    try:
        return sock.recv(RECV_BYTES)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
