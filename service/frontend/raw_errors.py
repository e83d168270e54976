"""Error answers written straight to a socket, outside Flask: by gunicorn (a bad request line
or header) and by the worker's event loop (a request that did not arrive in time). Every
error answer, these and the protocols', has the one JSON shape of `error_document`."""

from __future__ import annotations

import socket

import orjson

from service import metrics


def error_code(reason: str) -> str:
    """Return a reason phrase as an error code: "Method Not Allowed" -> "method_not_allowed"."""
    return reason.lower().replace(" ", "_")


def error_document(code: str, message: str) -> dict[str, dict[str, str]]:
    """Return the JSON error shape of every error answer."""
    return {"error": {"code": code, "message": message}}


def write_server_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """Write an error gunicorn answers itself (a bad request line or header, found before
    the app runs), in the service's JSON shape rather than gunicorn's HTML page."""
    code = error_code(reason)
    metrics.ERRORS.labels(code, metrics.HTTP).inc()
    sock.settimeout(1.0)  # a few hundred bytes: a client that reads none is not waited for
    sock.sendall(error_bytes(status, reason, code, message or reason))


def error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    """Return a whole JSON error response, closing the connection, as bytes to send."""
    body = orjson.dumps(error_document(code, message))
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body
