"""Slow clients against a real gunicorn: they are cut off at their deadline, and nobody else
waits for them (service/frontend/worker.py reads each request whole before a thread gets it)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from collections.abc import Iterator

import orjson
import pytest
import requests
from gunicorn.config import Config
from gunicorn.http.errors import ParseException
from gunicorn.http.parser import RequestParser

from service.frontend.framing import Framing, RequestScan
from tests.conftest import Server, distinct_images, expected_probabilities, start_server
from tests.load import metric, scrape, worker_pids
from tests.slow_clients import CanaryReport, Trickler, canary

# --- the scan agrees with gunicorn's own parser ----------------------------------------------

HEADER_LIMIT = 8190 + 100 * (8190 + 2) + 4  # the worker's, from gunicorn_conf's limits
BODY_LIMIT = 1000


def scan(data: bytes, byte_by_byte: bool = False) -> Framing:
    scanner = RequestScan(8190, HEADER_LIMIT, BODY_LIMIT, 8190)
    if not byte_by_byte:
        return scanner.scan(bytearray(data))
    buf = bytearray()
    verdict = Framing.INCOMPLETE
    for i in range(len(data)):
        buf.append(data[i])
        verdict = scanner.scan(buf)
        if verdict is not Framing.INCOMPLETE:
            assert i == len(data) - 1, f"{verdict} after {i + 1} of {len(data)} bytes"
    return verdict


class WouldBlock(Exception):
    """gunicorn's parser asked for a byte the client has not sent."""


def parse_without_more_bytes(data: bytes) -> str:
    """Let gunicorn parse `data` and read the body; say "parsed", "refused" or "needs more"."""
    cfg = Config()
    cfg.set("limit_request_line", 8190)

    def source() -> Iterator[bytes]:
        yield data
        raise WouldBlock

    try:
        request = next(RequestParser(cfg, source(), ("127.0.0.1", 1)))
        while request.body.read(8192):
            pass
    except WouldBlock:
        return "needs more"
    except ParseException:
        return "refused"
    return "parsed"


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + (
        body + b"0\r\n" + trailer + b"\r\n"
    )


COMPLETE = {
    "get": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "http/1.0": b"GET / HTTP/1.0\r\n\r\n",
    "length": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    "length-zero": b"POST /p HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "header-case": b"POST /p HTTP/1.1\r\ncOnTeNt-LeNgTh:  3 \r\n\r\nabc",
    "chunked": chunked(b"abc", b"defgh"),
    "chunked-empty": chunked(),
    "chunked-trailer": chunked(b"abc", trailer=b"X-Sum: 1\r\n"),
    "chunked-extension": b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;name=value\r\nabc\r\n0\r\n\r\n",
    "chunked-upper-hex": chunked(b"x" * 0xAB),
}
REFUSED = {
    "bad-chunk-size": b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
    "chunk-without-terminator": b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
    "negative-length": b"POST /p HTTP/1.1\r\nContent-Length: -5\r\n\r\nabc",
    "non-numeric-length": b"POST /p HTTP/1.1\r\nContent-Length: ab\r\n\r\n",
    "two-lengths": b"POST /p HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    "length-and-chunked": b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "gzip-coding": b"POST /p HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    "space-before-colon": b"POST /p HTTP/1.1\r\nContent-Length : 3\r\n\r\nabc",
    "bare-lf": b"POST /p HTTP/1.1\nHost: x\n\n",
    "request-line-over-limit": b"GET /" + b"a" * 8200,
}


@pytest.mark.parametrize("name", COMPLETE)
def test_a_whole_request_is_complete_at_its_last_byte_and_not_before(name):
    data = COMPLETE[name]
    assert parse_without_more_bytes(data) == "parsed"  # gunicorn agrees it is whole
    assert scan(data, byte_by_byte=True) is Framing.COMPLETE
    for cut in range(len(data)):
        # every prefix needs more bytes, for gunicorn and for the scan alike
        assert scan(data[:cut]) is Framing.INCOMPLETE, cut


@pytest.mark.parametrize("name", REFUSED)
def test_broken_framing_goes_to_the_parser_which_refuses_it_from_the_bytes_buffered(name):
    data = REFUSED[name]
    assert scan(data) is Framing.PARSER_DECIDES
    assert parse_without_more_bytes(data) == "refused"


def test_headers_over_the_limit_are_answered_by_the_event_loop():
    # gunicorn's parser reads on before it checks its limit: it would wait for more bytes.
    data = b"GET / HTTP/1.1\r\nX: " + b"a" * (HEADER_LIMIT + 10)
    assert parse_without_more_bytes(data) == "needs more"
    assert scan(data) is Framing.HEADERS_TOO_LARGE
    assert scan(data[: HEADER_LIMIT - 100]) is Framing.INCOMPLETE


def test_a_body_over_the_limit_goes_to_the_app_at_once_for_its_413():
    head = b"POST /p HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (BODY_LIMIT + 1)
    assert scan(head) is Framing.PARSER_DECIDES
    assert scan(head.replace(b"%d" % (BODY_LIMIT + 1), b"%d" % BODY_LIMIT)) is Framing.INCOMPLETE
    over = chunked(b"a" * 600, b"b" * 600)
    assert scan(over) is Framing.PARSER_DECIDES


def test_expect_continue_is_noticed_only_for_http_1_1():
    for version, expected in ((b"HTTP/1.1", True), (b"HTTP/1.0", False)):
        scanner = RequestScan(8190, HEADER_LIMIT, BODY_LIMIT, 8190)
        head = b"POST /p %s\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n" % version
        assert scanner.scan(bytearray(head)) is Framing.INCOMPLETE
        assert scanner.expects_continue is expected


# --- a real server under attack ----------------------------------------------------------------

CONNECTIONS = 256  # slow connections per attack: 16 times the server's 16 threads
CANARY_REQUESTS = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir) -> Iterator[Server]:
    """One server with the default settings (REQUEST_TIMEOUT_S=10), for every attack."""
    running = start_server(model_dir, tmp_path_factory.mktemp("slow"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def canary_images(cnn, classifier):
    images = distinct_images(5)
    return images, [expected_probabilities(cnn, data, classifier.info.spec) for data in images]


def wait_for_arriving(url: str, at_least: int, within_s: float = 60) -> float:
    """Wait until the server holds `at_least` connections in its event loop; return how many."""
    deadline = time.monotonic() + within_s
    while (held := metric(scrape(url), "cnn_http_requests_arriving")) < at_least:
        assert time.monotonic() < deadline, f"only {held} connections held in {within_s} s"
        time.sleep(0.2)
    return held


def timed_get(url: str) -> float:
    started = time.monotonic()
    assert requests.get(url, timeout=30).status_code == 200
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "every_s"), [("headers", 0.5), ("bodies", 0.5), ("both", 0.05)])
def test_slow_clients_do_not_starve_anyone_else(server, canary_images, kind, every_s):
    images, expected = canary_images
    workers = worker_pids(server.process.pid)
    idle = canary(server.url, images, expected, CANARY_REQUESTS)
    assert idle.problems == []
    with Trickler(server.url, kind, CONNECTIONS, every_s) as attack:
        held = wait_for_arriving(server.url, CONNECTIONS)
        attacked: CanaryReport = canary(server.url, images, expected, CANARY_REQUESTS)
        health_s = max(timed_get(server.url + "/healthz"), timed_get(server.url + "/readyz"))
        held_after = metric(scrape(server.url), "cnn_http_requests_arriving")
    print(
        f"\n{kind}: {held:.0f} connections held; canary p99 idle "
        f"{idle.percentile(99) * 1000:.1f} ms, attacked {attacked.percentile(99) * 1000:.1f} ms "
        f"({len(attacked.latencies_s)}/{CANARY_REQUESTS} answered); health {health_s * 1000:.1f}"
        f" ms; attackers opened {attack.opened}, cut off {dict(attack.outcomes)}"
    )

    assert attacked.problems == []
    # A starved request waits for a slow client's 10 s deadline, or for ever: half the
    # deadline is many times what a served one takes even on a slow machine.
    assert max(attacked.latencies_s) < 5.0, attacked.latencies_s
    assert health_s < 5.0
    assert held_after >= CONNECTIONS / 2, "the attack was over before the canary was"
    assert worker_pids(server.process.pid) == workers


@pytest.fixture
def short_deadline_server(server_factory, model_dir) -> Server:
    return server_factory(model_dir, REQUEST_TIMEOUT_S="2")


@pytest.mark.slow
def test_each_slow_client_is_cut_off_at_its_deadline_with_a_json_408(short_deadline_server):
    url = short_deadline_server.url
    with (
        Trickler(url, "headers", 20, 0.5) as headers,
        Trickler(url, "bodies", 20, 0.5) as bodies,
        Trickler(url, "both", 20, 0.05) as both,
    ):
        deadline = time.monotonic() + 120
        attacks = (headers, bodies, both)
        while min(sum(a.outcomes.values()) for a in attacks) < 20:
            assert time.monotonic() < deadline, [a.outcomes for a in attacks]
            time.sleep(0.2)
    for attack in attacks:
        print(
            f"\n{attack.kind}: {dict(attack.outcomes)}, held {min(attack.held_s):.1f}-"
            f"{max(attack.held_s):.1f} s"
        )
        # Each had sent part of a request, so each gets an answer, not just a close.
        assert set(attack.outcomes) == {"408"}, attack.outcomes
        # Not before the deadline (from its first byte, sent after it connected), and
        # within a few poll turns of it.
        assert min(attack.held_s) >= 2.0
        assert max(attack.held_s) < 2.0 + 20
    errors = metric(scrape(url), "cnn_errors_total", code="request_timeout", protocol="http")
    assert errors >= 60


@pytest.mark.slow
def test_the_408_of_a_slow_client_is_json(short_deadline_server):
    host, port = short_deadline_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 408
        assert response.getheader("Content-Type") == "application/json"
        assert response.getheader("Connection") == "close"
        body = response.read()
    assert b'"code":"request_timeout"' in body


@pytest.mark.slow
def test_headers_over_the_limit_get_a_json_431(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with contextlib.suppress(OSError):  # the server may stop reading before the end
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (HEADER_LIMIT + 10))
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 431
        assert response.getheader("Content-Type") == "application/json"
        body = orjson.loads(response.read())
    assert body["error"]["code"] == "request_header_fields_too_large"
    assert requests.get(server.url + "/healthz", timeout=30).status_code == 200


@pytest.mark.slow
def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(short_deadline_server):
    host, port = short_deadline_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        started = time.monotonic()
        answer = sock.recv(4096)
        waited = time.monotonic() - started
    assert answer == b""  # nothing to answer: no request had begun
    assert 2.0 <= waited < 2.0 + 20


@pytest.mark.slow
def test_expect_100_continue_gets_one_interim_answer_before_the_body(server, canary_images):
    images, expected = canary_images
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(images[0])
        )
        interim = sock.recv(4096)  # the body is not sent until this comes
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(images[0])
        response = http.client.HTTPResponse(sock)
        response.begin()  # http.client would skip a second 100 Continue: look at the bytes
        assert response.status == 200
        got = response.read()
    probabilities = requests.models.complexjson.loads(got)["predictions"][0]["probabilities"]
    assert probabilities == pytest.approx(expected[0].tolist(), abs=1e-5)


@pytest.mark.slow
def test_pipelined_requests_are_answered_in_order(server, canary_images):
    images, expected = canary_images
    host, port = server.url.removeprefix("http://").split(":")
    requests_bytes = b"".join(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        for data in images[:3]
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(requests_bytes)
        answers = []
        for _ in range(3):
            response = http.client.HTTPResponse(sock)
            response.begin()
            answers.append(requests.models.complexjson.loads(response.read()))
    for answer, want in zip(answers, expected[:3], strict=True):
        assert answer["predictions"][0]["probabilities"] == pytest.approx(want.tolist(), abs=1e-5)


@pytest.mark.slow
def test_big_stalled_uploads_wait_for_buffer_room_while_small_requests_go_on(
    server_factory, model_dir, canary_images
):
    body_limit = 200_000  # so the worker buffers at most 800 KB of requests still arriving
    server = server_factory(model_dir, MAX_BODY_BYTES=str(body_limit), REQUEST_TIMEOUT_S="60")
    images, expected = canary_images
    host, port = server.url.removeprefix("http://").split(":")
    length, sent_first = 190_000, 150_000  # 8 of these: 1.2 MB, over the budget
    junk = bytes(range(256)) * (length // 256 + 1)
    uploads = []
    for _ in range(8):
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (length, junk[:sent_first])
        )
        uploads.append(sock)
    try:
        wait_for_arriving(server.url, 8)
        meanwhile = canary(server.url, images, expected, 10)
        assert meanwhile.problems == []
        for sock in uploads:
            sock.sendall(junk[sent_first:length])
        for sock in uploads:  # each upload is read in its turn, and answered
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 400, response.read()
            assert b'"code":"invalid_image"' in response.read()
    finally:
        for sock in uploads:
            sock.close()
