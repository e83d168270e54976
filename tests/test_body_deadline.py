"""The body deadline: a trickling client is cut off, a prompt one is left alone."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from service.errors import RequestTimeout
from service.frontend.body_deadline import BodyWithDeadline


class LoopingReader:
    """Reads as gunicorn's body reader does: recv again and again until `size` bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    readline = read


@pytest.fixture
def connection():
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def test_trickling_body_is_cut_off_at_the_deadline(connection):
    server, client = connection
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            client.send(b"x")  # a byte every 50 ms: no single recv ever waits long
            time.sleep(0.05)

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    body = BodyWithDeadline(LoopingReader(server), server, started + 0.5)
    try:
        with pytest.raises(RequestTimeout):
            body.read(100_000)
    finally:
        stop.set()
        sender.join()
    # Not before the deadline; and the body never ends, so without the cut-off the read would
    # go on for as long as the trickle does (for ever), not a few seconds.
    assert 0.5 <= time.monotonic() - started < 30


def test_prompt_body_is_read_and_the_socket_left_open(connection):
    server, client = connection
    client.sendall(b"y" * 1000)
    body = BodyWithDeadline(LoopingReader(server), server, time.monotonic() + 0.3)
    assert body.read(1000) == b"y" * 1000
    time.sleep(0.5)  # past the deadline: the released watch must not fire
    client.sendall(b"next request")
    assert server.recv(100) == b"next request"


def test_read_after_the_deadline_fails_at_once(connection):
    server, _ = connection
    body = BodyWithDeadline(LoopingReader(server), server, time.monotonic() - 1)
    with pytest.raises(RequestTimeout):
        body.readline(10)
