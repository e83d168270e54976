"""Typed errors of the service, named after the condition, each with its HTTP status.

The status (and any header an answer needs) lives on the type; each protocol in
service/frontend/http only shapes the body, in one handler per protocol. Errors cross from a
runner to a worker as their code (service/channel/wire.py) and are rebuilt here.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A failure to report to the client; `code` is the stable machine-readable name."""

    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Return the headers an answer to this error carries."""
        return {}


class InvalidRequest(ServiceError):
    """The request is malformed: bad JSON, bad query parameter, no image."""

    code = "invalid_request"
    status = 400


class InvalidImage(ServiceError):
    """An upload is not a decodable image of a supported format."""

    code = "invalid_image"
    status = 400


class PayloadTooLarge(ServiceError):
    """The body, an image's pixel count or the image count is over its limit."""

    code = "payload_too_large"
    status = 413


class RequestTimeout(ServiceError):
    """The request body did not arrive before the request's deadline (a slow client)."""

    code = "request_timeout"
    status = 408


class MalformedBody(ServiceError):
    """The body's HTTP framing is broken (a bad chunk size, a missing chunk terminator)."""

    code = "malformed_body"
    status = 400


class UnsupportedMediaType(ServiceError):
    """The request's Content-Type is not one /predict accepts."""

    code = "unsupported_media_type"
    status = 415


class Unauthorized(ServiceError):
    """The request lacks the bearer token the service was configured with."""

    code = "unauthorized"
    status = 401

    def headers(self) -> dict[str, str]:
        """Name the scheme the client must use."""
        return {"WWW-Authenticate": "Bearer"}


class Overloaded(ServiceError):
    """The batch queue is full, or cannot serve the request within its deadline."""

    code = "overloaded"
    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        """Tell the client when to ask again."""
        return {"Retry-After": str(self.retry_after_s)}


class ModelNotReady(ServiceError):
    """The model is still loading, the service is draining, or the batcher has stopped."""

    code = "not_ready"
    status = 503

    def headers(self) -> dict[str, str]:
        """Tell the client when to ask again (a load, a drain or a restart takes seconds)."""
        return {"Retry-After": "1"}


class ModelNotFound(ServiceError):
    """No model of the name (and version) asked for is served."""

    code = "model_not_found"
    status = 404


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its images were run."""

    code = "timeout"
    status = 504


class InferenceFailed(ServiceError):
    """The forward pass of the batch holding this request's images raised."""

    code = "inference_failed"
    status = 500


def rebuild(code: str, message: str, retry_after_s: int = 1) -> ServiceError:
    """Return the typed error whose `code` is given, as it crossed from a runner."""
    kind = _BY_CODE.get(code, ServiceError)
    if kind is Overloaded:
        return Overloaded(message, retry_after_s)
    return kind(message)


def _subclasses(kind: type[ServiceError]) -> list[type[ServiceError]]:
    return [kind, *(sub for child in kind.__subclasses__() for sub in _subclasses(child))]


_BY_CODE = {kind.code: kind for kind in reversed(_subclasses(ServiceError))}
