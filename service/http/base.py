"""What every protocol's routes share: JSON answers, the body, numeric parameters, the token."""

from __future__ import annotations

import hmac

import orjson
from flask import Request, Response

from service.errors import InvalidRequest, Unauthorized


def json_response(body: object, status: int = 200) -> Response:
    """Return `body` as a JSON response (orjson: fast on long float lists)."""
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def read_body(req: Request) -> bytes:
    """Return the whole request body, raising RequestEntityTooLarge over the size limit."""
    data = req.stream.read()
    # A chunked body is cut at the size limit without error; reading on raises the 413.
    req.stream.read(1)
    return data


def number_parameter(raw: str | None, name: str, kind: type, default: float) -> float:
    """Parse a numeric request parameter, or return `default` when it is absent."""
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a {kind.__name__}, got {raw!r}") from None


def authorize(req: Request, token: str) -> None:
    """Refuse the request unless it carries the configured bearer token (if any)."""
    if not token:
        return
    scheme, _, supplied = req.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        supplied.strip().encode(), token.encode()
    ):
        raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")
