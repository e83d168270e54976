"""Slow-client attackers and a checked canary, for the tests and bench/slow_clients.py."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import requests

# What each kind of attacker sends at once, then what it trickles a byte at a time.
HEAD = "POST /predict HTTP/1.1\r\nHost: attacker\r\n"
BODY_HEAD = HEAD + "Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
KINDS: dict[str, tuple[bytes, bytes]] = {
    # the request line, then a header that never ends
    "headers": (HEAD.encode(), b"X-Slow: " + b"a" * 100_000),
    # whole headers, then a body that never ends
    "bodies": (BODY_HEAD.encode(), b"\0" * 100_000),
    # the request line, then the rest of the headers and the body, all a byte at a time
    "both": (
        HEAD.encode(),
        (BODY_HEAD.removeprefix(HEAD)).encode() + b"\0" * 100_000,
    ),
}


@dataclass
class _Attacker:
    sock: socket.socket
    trickle: bytes
    opened_at: float
    sent: int = 0
    ended_at: float = 0.0


@dataclass
class Trickler:
    """Hold `connections` connections to `url`, each trickling one byte every `every_s`.

    An attacker the server cuts off (an answer or a close) is replaced by a fresh one, so the
    attack lasts until stop(). Outcomes count "408"-like status lines and plain "closed".
    """

    url: str
    kind: str
    connections: int
    every_s: float
    outcomes: Counter[str] = field(default_factory=Counter)
    held_s: list[float] = field(default_factory=list)  # how long each cut-off one was held
    opened: int = 0

    def __post_init__(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        self._address = (host, int(port))
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> Trickler:
        self._thread.start()
        assert self._started.wait(60), "the attackers could not connect"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _open(self, selector: selectors.BaseSelector) -> None:
        prefix, trickle = KINDS[self.kind]
        sock = socket.create_connection(self._address, timeout=10)
        sock.sendall(prefix)
        sock.setblocking(False)
        attacker = _Attacker(sock, trickle, time.monotonic())
        selector.register(sock, selectors.EVENT_READ, attacker)
        self.opened += 1

    def _end(self, selector: selectors.BaseSelector, attacker: _Attacker, outcome: str) -> None:
        selector.unregister(attacker.sock)
        attacker.sock.close()
        with self._lock:
            self.outcomes[outcome] += 1
            self.held_s.append(time.monotonic() - attacker.opened_at)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for _ in range(self.connections):
            self._open(selector)
        self._started.set()
        next_tick = time.monotonic()
        while not self._stop.is_set():
            for key, _ in selector.select(max(0.0, next_tick - time.monotonic())):
                attacker: _Attacker = key.data
                try:
                    answer = attacker.sock.recv(4096)
                except OSError:
                    answer = b""
                status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else ""
                self._end(selector, attacker, status or "closed")
                self._open(selector)
            if time.monotonic() < next_tick:
                continue
            next_tick += self.every_s
            for key in list(selector.get_map().values()):
                attacker = key.data
                try:
                    attacker.sock.send(attacker.trickle[attacker.sent : attacker.sent + 1])
                    attacker.sent += 1
                except OSError:
                    self._end(selector, attacker, "closed")
                    self._open(selector)
        for key in list(selector.get_map().values()):
            key.data.sock.close()
        selector.close()


@dataclass
class CanaryReport:
    """What a canary saw: each answer's latency, and every wrong or missing answer."""

    latencies_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """Return the q-th percentile of the latencies (seconds)."""
        return float(np.percentile(self.latencies_s, q))


def canary(
    url: str,
    images: list[bytes],
    expected: list[np.ndarray],
    count: int,
    every_s: float = 0.1,
    timeout_s: float = 30,
) -> CanaryReport:
    """Send `count` valid requests, one every `every_s`, each on a fresh connection as a new
    client would, and check each answer's probabilities against `expected`."""
    report = CanaryReport()
    for i in range(count):
        data, want = images[i % len(images)], expected[i % len(images)]
        started = time.monotonic()
        try:
            response = requests.post(
                f"{url}/predict",
                data=data,
                headers={"Content-Type": "image/png", "Connection": "close"},
                timeout=timeout_s,
            )
            latency = time.monotonic() - started
            got = response.json()["predictions"][0]["probabilities"]
            np.testing.assert_allclose(got, want, atol=1e-5)
        except Exception as exc:  # every kind of wrong answer is a problem to report
            report.problems.append(f"request {i}: {type(exc).__name__}: {exc}")
        else:
            report.latencies_s.append(latency)
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))
    return report
