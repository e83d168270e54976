"""How much of an HTTP/1.1 request a buffer holds: the event loop's scan of its framing.

The worker (service/frontend/worker.py) reads a request in its event loop until this scan
says it has arrived whole, or that gunicorn's own parser can judge what has arrived.
"""

from __future__ import annotations

from enum import Enum

HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class Framing(Enum):
    """How far the bytes buffered so far frame a request."""

    INCOMPLETE = "incomplete"  # more bytes are needed
    COMPLETE = "complete"  # the request line, headers and body are all buffered
    PARSER_DECIDES = "parser_decides"  # gunicorn's parser can judge these bytes as they are
    # No blank line within gunicorn's limit: its parser would wait for more before refusing,
    # so the event loop answers (431) itself.
    HEADERS_TOO_LARGE = "headers_too_large"


class RequestScan:
    """Tell, incrementally, whether a buffer holds a whole HTTP/1.1 request.

    Deliberately looser than gunicorn's parser, never stricter: anything unusual goes to the
    parser (PARSER_DECIDES), which refuses it with a 400 from the bytes already buffered.
    """

    def __init__(
        self, line_limit: int, header_limit: int, body_limit: int, chunk_line_limit: int
    ) -> None:
        self._line_limit = line_limit
        self.header_limit = header_limit
        self._body_limit = body_limit
        self._chunk_line_limit = chunk_line_limit
        self._searched = 0  # where the search for the end of the headers resumes
        self.headers_end = -1  # the offset just past the blank line ending the headers
        self.expects_continue = False
        self._length = -1  # Content-Length; -1: chunked or none
        self._chunked = False
        self._chunk_at = 0  # offset of the next chunk-size line
        self._decoded = 0

    def scan(self, buf: bytearray) -> Framing:
        """Scan what `buf` holds now (it only ever grows between calls)."""
        if self.headers_end < 0:
            verdict = self._scan_headers(buf)
            if verdict is not Framing.COMPLETE:
                return verdict
        if self._chunked:
            return self._scan_chunks(buf)
        if len(buf) >= self.headers_end + self._length:
            return Framing.COMPLETE
        return Framing.INCOMPLETE

    def _scan_headers(self, buf: bytearray) -> Framing:
        end = buf.find(b"\r\n\r\n", self._searched)
        if end < 0:
            if b"\n\n" in buf:
                return Framing.PARSER_DECIDES  # bare LFs: refused as soon as seen
            if len(buf) > self._line_limit + 2 and buf.find(b"\r\n", 0, self._line_limit + 2) < 0:
                return Framing.PARSER_DECIDES  # a request line over its limit
            if len(buf) > self.header_limit:
                return Framing.HEADERS_TOO_LARGE
            self._searched = max(0, len(buf) - 3)
            return Framing.INCOMPLETE
        self.headers_end = end + 4
        request_line, *lines = bytes(buf[:end]).split(b"\r\n")
        lengths: list[bytes] = []
        codings: list[bytes] = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or name != name.strip():
                return Framing.PARSER_DECIDES
            name = name.lower()
            value = value.strip(b" \t")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expects_continue = request_line.endswith(b"HTTP/1.1")
        if codings:
            if lengths or codings[-1] != b"chunked":
                return Framing.PARSER_DECIDES
            self._chunked = True
            self._chunk_at = self.headers_end
            self._length = 0
        elif lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                return Framing.PARSER_DECIDES
            self._length = int(lengths[0])
            if self._length > self._body_limit:
                return Framing.PARSER_DECIDES  # the app answers 413 without reading it
        else:
            self._length = 0
        return Framing.COMPLETE

    def _scan_chunks(self, buf: bytearray) -> Framing:
        while True:
            line_end = buf.find(b"\r\n", self._chunk_at)
            if line_end < 0:
                if len(buf) - self._chunk_at > self._chunk_line_limit:
                    return Framing.PARSER_DECIDES
                return Framing.INCOMPLETE
            size_text = bytes(buf[self._chunk_at : line_end]).split(b";", 1)[0].rstrip(b" \t")
            if not size_text or not HEX_DIGITS.issuperset(size_text):
                return Framing.PARSER_DECIDES
            size = int(size_text, 16)
            if size == 0:
                return self._scan_trailers(buf, line_end + 2)
            data_end = line_end + 2 + size
            if len(buf) < data_end + 2:
                return Framing.INCOMPLETE
            if buf[data_end : data_end + 2] != b"\r\n":
                return Framing.PARSER_DECIDES
            self._decoded += size
            if self._decoded > self._body_limit:
                return Framing.PARSER_DECIDES
            self._chunk_at = data_end + 2

    def _scan_trailers(self, buf: bytearray, start: int) -> Framing:
        if buf[start : start + 2] == b"\r\n" or buf.find(b"\r\n\r\n", start) >= 0:
            return Framing.COMPLETE
        if len(buf) - start > self.header_limit:
            return Framing.PARSER_DECIDES
        return Framing.INCOMPLETE
