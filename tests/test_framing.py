"""Malformed HTTP framing against a real gunicorn: each case is a JSON 400 (or a close where no
response can be framed), never a 500, and the connection is not reused for the leftovers."""

from __future__ import annotations

import http.client
import socket

import orjson
import pytest
import requests

from tests.conftest import image_bytes, start_server
from tests.load import post_png

pytestmark = pytest.mark.slow

PNG = image_bytes((32, 32), seed=3)


def head(content_type: str, framing: str) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"
    ).encode()


CHUNKED = "Transfer-Encoding: chunked"
MULTIPART = "multipart/form-data; boundary=b"
BAD = "malformed_body"
# (request bytes, whether the client then half-closes, the error code expected)
CASES = {
    "chunk-size-zz": (head("image/png", CHUNKED) + b"zz\r\nabc\r\n0\r\n\r\n", False, BAD),
    "second-chunk-1x": (
        head("image/png", CHUNKED) + b"4\r\nabcd\r\n1x\r\na\r\n0\r\n\r\n", False, BAD
    ),
    "multipart-chunk-zz": (head(MULTIPART, CHUNKED) + b"zz\r\nab\r\n0\r\n\r\n", False, BAD),
    "chunk-without-terminator": (
        head("image/png", CHUNKED) + b"3\r\nabcXY0\r\n\r\n", False, BAD
    ),
    "truncated-chunked": (head("image/png", CHUNKED) + b"100\r\nabcd", True, None),
    "negative-length": (head("image/png", "Content-Length: -5") + b"abc", False, "bad_request"),
    "non-numeric-length": (head("image/png", "Content-Length: ab") + b"abc", False, "bad_request"),
    "body-shorter-than-length": (
        head("image/png", "Content-Length: 1000") + PNG[:100], True, None
    ),
}  # fmt: skip


def exchange(url: str, data: bytes, half_close: bool) -> tuple[int, dict, bytes]:
    """Send raw bytes; return the answer's status, JSON body, and what follows it (b'' = closed)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        assert response.getheader("Content-Type") == "application/json", body
        document = orjson.loads(body)
        # Whatever bytes the client sent after the broken framing must not be answered as a
        # request of their own: the server closes the connection instead.
        after = sock.recv(4096)
        return response.status, document, after


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    """Return one real server for every case: each must leave it serving."""
    running = start_server(model_dir, tmp_path_factory.mktemp("framing"))
    yield running
    running.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_framing_is_a_json_400_and_the_connection_closes(server, case):
    data, half_close, code = CASES[case]
    status, document, after = exchange(server.url, data, half_close)
    assert status == 400, document
    assert set(document) == {"error"} and document["error"]["message"], document
    if code is not None:
        assert document["error"]["code"] == code, document
    assert after == b"", f"the connection was reused for the leftovers: {after[:100]!r}"
    assert post_png(server.url, PNG).status_code == 200
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
