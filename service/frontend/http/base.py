"""What every protocol's routes share: JSON answers, error answers, the body, base64 images,
numeric parameters, the bearer token."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable

import orjson
from flask import Blueprint, Flask, Request, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from service import metrics
from service.errors import InvalidRequest, PayloadTooLarge, ServiceError
from service.frontend.protocol_rules import check_bearer
from service.frontend.raw_errors import error_code
from service.frontend.versions import RemoteVersion, Upload
from service.registry import Models

log = logging.getLogger(__name__)

# A protocol's error body, from the error's code and message.
ErrorBody = Callable[[str, str], object]


def lease(
    name: str | None = None, version: str | None = None, label: str | None = None
) -> RemoteVersion:
    """Return the model version a request asked for, held until the request is answered."""
    models: Models = current_app.extensions["models"]
    served = models.acquire(name, version, label)
    g.setdefault("leases", []).append(served)
    return served


def release_leases(_error: BaseException | None = None) -> None:
    """Release what `lease` held (Flask's teardown of every request)."""
    models: Models = current_app.extensions["models"]
    for served in g.pop("leases", ()):
        models.release(served)


def json_response(body: object, status: int = 200) -> Response:
    """Return `body` as a JSON response (orjson: fast on long float lists)."""
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def message_only(code: str, message: str) -> dict[str, str]:
    """Return the error body of KServe V2 and TF Serving: {"error": "<message>"}."""
    return {"error": message}


def answer_errors(target: Flask | Blueprint, body: ErrorBody) -> None:
    """Answer every error raised under `target` in one protocol's shape, `body`.

    Typed errors carry their status and headers; werkzeug's HTTP errors keep theirs (`Allow`
    on a 405); anything unexpected is a 500 naming only the request id. Each is counted in
    cnn_errors_total and logged once.
    """

    def answer(status: int, code: str, message: str) -> Response:
        metrics.ERRORS.labels(code, metrics.HTTP).inc()
        extra = {"request_id": g.get("request_id"), "status": status, "code": code}
        log.log(
            logging.ERROR if status >= 500 else logging.INFO,
            message,
            extra={**extra, "path": request.path},
        )
        return json_response(body(code, message), status)

    def service_error(error: ServiceError) -> Response:
        response = answer(error.status, error.code, error.message)
        response.headers.update(error.headers())
        return response

    def http_error(error: HTTPException) -> Response:
        if isinstance(error, RequestEntityTooLarge):
            limit = current_app.config["SETTINGS"].max_body_bytes
            message = f"the request body is over the limit of {limit} bytes"
            if request.mimetype == "multipart/form-data":
                message += " (or has too many form parts)"
            return answer(413, PayloadTooLarge.code, message)
        status = error.code or 500
        response = answer(
            status, error_code(error.name or "error"), error.description or error.name
        )
        allow = error.get_response().headers.get("Allow") if status == 405 else None
        if allow:
            response.headers["Allow"] = allow
        return response

    def unexpected_error(error: Exception) -> Response:
        # Logged once, with the traceback; the client gets only the request id.
        log.exception("unhandled error", extra={"request_id": g.get("request_id")})
        metrics.ERRORS.labels("internal", metrics.HTTP).inc()
        message = f"internal error (request id {g.get('request_id', '-')})"
        return json_response(body("internal", message), 500)

    target.register_error_handler(ServiceError, service_error)
    target.register_error_handler(HTTPException, http_error)
    target.register_error_handler(Exception, unexpected_error)


def read_body(req: Request) -> bytes:
    """Return the whole request body, refusing one over the size limit (413)."""
    data = req.stream.read()
    # A chunked body is cut at the size limit without error; reading on raises the 413.
    req.stream.read(1)
    return data


def b64_upload(name: str, encoded: object) -> Upload:
    """Return the image of a TF-style {"b64": "<base64>"} object."""
    value = encoded.get("b64") if isinstance(encoded, dict) else None
    if not isinstance(value, str):
        raise InvalidRequest(f'{name}: each image must be an object {{"b64": "<base64>"}}')
    try:
        return Upload(name, base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{name}: 'b64' is not valid base64") from None


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
    check_bearer(
        req.headers.get("Authorization", ""), token, "'Authorization: Bearer <token>' header"
    )
