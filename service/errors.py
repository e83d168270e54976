"""Typed errors of the service, named after the condition; the HTTP layer maps them to statuses."""

from __future__ import annotations


class ServiceError(Exception):
    """A failure to report to the client; `code` is the stable machine-readable name."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    """The request is malformed: bad JSON, bad query parameter, no image."""

    code = "invalid_request"


class InvalidImage(ServiceError):
    """An upload is not a decodable image of a supported format."""

    code = "invalid_image"


class PayloadTooLarge(ServiceError):
    """The body, an image's pixel count or the image count is over its limit."""

    code = "payload_too_large"


class RequestTimeout(ServiceError):
    """The request body did not arrive before the request's deadline (a slow client)."""

    code = "request_timeout"


class MalformedBody(ServiceError):
    """The body's HTTP framing is broken (a bad chunk size, a missing chunk terminator)."""

    code = "malformed_body"


class UnsupportedMediaType(ServiceError):
    """The request's Content-Type is not one /predict accepts."""

    code = "unsupported_media_type"


class Unauthorized(ServiceError):
    """The request lacks the bearer token the service was configured with."""

    code = "unauthorized"


class Overloaded(ServiceError):
    """The batch queue is full, or cannot serve the request within its deadline."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotReady(ServiceError):
    """The model is still loading, the service is draining, or the batcher has stopped."""

    code = "not_ready"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its images were run."""

    code = "timeout"


class InferenceFailed(ServiceError):
    """The forward pass of the batch holding this request's images raised."""

    code = "inference_failed"


class ModelLoadError(Exception):
    """The model folder cannot be served; the message is one line naming the file and fault."""
