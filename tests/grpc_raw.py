"""A bare HTTP/2 client for the gRPC tests: the frames a misbehaving client sends, by hand.

Just enough of RFC 9113 to open a connection, send one gRPC call whose headers are HPACK
literals (no Huffman, no table) and whose body is any bytes, and then do nothing more: for a
client that stops reading, whose flow-control window is 0 so that no answer can reach it.
"""

from __future__ import annotations

import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """Return one HTTP/2 frame."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """Return a header as an HPACK literal without indexing (lengths under 127)."""
    encoded_name, encoded_value = name.encode(), value.encode()
    return (
        bytes([0, len(encoded_name)]) + encoded_name + bytes([len(encoded_value)]) + encoded_value
    )


def grpc_message(message: bytes) -> bytes:
    """Return a gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def idle_connection(port: int) -> socket.socket:
    """Open an HTTP/2 connection that says hello (preface and SETTINGS) and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
    return sock


def unfinished_call(
    port: int, path: str, message: bytes, metadata: list[tuple[str, str]]
) -> socket.socket:
    """Open a connection that starts one call and sends half of its message, never the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    framed = grpc_message(message)
    sock.sendall(
        PREFACE
        + frame(SETTINGS, 0, 0, b"")
        + frame(HEADERS, END_HEADERS, 1, _headers(port, path, metadata))
        + frame(DATA, 0, 1, framed[: len(framed) // 2])
    )
    return sock


def _headers(port: int, path: str, metadata: list[tuple[str, str]]) -> bytes:
    return b"".join(
        _literal(name, value)
        for name, value in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
    )


def stalled_call(
    port: int, path: str, message: bytes, metadata: list[tuple[str, str]]
) -> socket.socket:
    """Open a connection that sends one call to `path` and can receive no answer (its window
    is 0 and it never reads); return its socket, for the caller to close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    settings = struct.pack(">HI", INITIAL_WINDOW_SIZE, 0)
    sock.sendall(
        PREFACE
        + frame(SETTINGS, 0, 0, settings)
        + frame(HEADERS, END_HEADERS, 1, _headers(port, path, metadata))
        + frame(DATA, END_STREAM, 1, grpc_message(message))
    )
    return sock
