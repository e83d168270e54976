"""What every RPC shares: its deadline, token and request id, its metrics and log line, and
the one place where typed errors become gRPC status codes.

Each method is registered with raw bytes in and out, so that a message that is not valid
protobuf is this code's INVALID_ARGUMENT, not grpcio's INTERNAL; bad input never ends as
UNKNOWN or INTERNAL. The server is grpcio's asyncio one: a call waits for its whole message
in the event loop, and takes one of the request threads only for its work, so clients that
send slowly, or never finish, hold no thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from service import metrics
from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidImage,
    InvalidRequest,
    MalformedBody,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)
from service.frontend import protocol_rules

log = logging.getLogger(__name__)

# Each typed error's gRPC status. An over-limit message is RESOURCE_EXHAUSTED, as grpcio
# answers one over the maximum message size itself; a refusal to take work now is
# UNAVAILABLE, the code clients retry, with its pushback in the trailers.
STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    MalformedBody: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
}
# gRPC's retry pushback (the retry design, A6), and the HTTP header's twin for people.
PUSHBACK = "grpc-retry-pushback-ms"


@dataclass(frozen=True)
class Call:
    """One RPC as a method sees it: when it must be answered by, and its id for the logs."""

    deadline: float
    request_id: str
    started: float


def status_of(error: ServiceError) -> grpc.StatusCode:
    """Return the gRPC status of a typed error (INTERNAL only for the server's own faults)."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return grpc.StatusCode.INTERNAL


def trailers(error: ServiceError) -> list[tuple[str, str]]:
    """Return the trailing metadata an error's answer carries: when to retry, if it says."""
    retry_after = error.headers().get("Retry-After")
    if retry_after is None:
        return []
    return [(PUSHBACK, str(int(float(retry_after) * 1000))), ("retry-after", retry_after)]


class Methods:
    """Builds the handlers of one service's unary methods around their shared rules."""

    def __init__(
        self, service: str, token: str, timeout_s: float, threads: ThreadPoolExecutor
    ) -> None:
        """Serve methods of `service` (its full name) on `threads`, asking for `token` where
        told to, capping each client's deadline at `timeout_s`."""
        self.service = service
        self.token = token
        self.timeout_s = timeout_s
        self.threads = threads
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def unary(
        self,
        name: str,
        request_type: type[Message],
        method: Callable[[Any, Call], Message],
        authorized: bool = False,
        before: Callable[[], None] | None = None,
    ) -> None:
        """Register `method` as the RPC `name`: parsed, authorized if told, timed, counted,
        its errors answered with their status; `before` runs first (a catalogue refresh)."""
        endpoint = f"/{self.service}/{name}"

        def work(raw: bytes, call: Call) -> bytes:
            if before is not None:
                before()
            try:
                request = request_type.FromString(raw)
            except DecodeError:
                raise InvalidRequest(
                    f"the request is not a valid {request_type.DESCRIPTOR.full_name} message"
                ) from None
            return method(request, call).SerializeToString()

        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            arrived = time.monotonic()
            metadata = dict(context.invocation_metadata())
            request_id = protocol_rules.request_id(str(metadata.get("x-request-id", "")))
            code = grpc.StatusCode.OK
            context.set_trailing_metadata([("x-request-id", request_id)])
            call: Call | None = None
            try:
                if authorized:
                    protocol_rules.check_bearer(
                        str(metadata.get("authorization", "")),
                        self.token,
                        "'authorization: Bearer <token>' metadata",
                    )
                remaining = context.time_remaining()
                timeout_s = self.timeout_s if remaining is None else min(remaining, self.timeout_s)
                call = Call(arrived + max(0.0, timeout_s), request_id, started)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.threads, work, raw, call)
            except asyncio.CancelledError:
                # grpcio cancels a call whose client deadline has passed: that is a timeout,
                # counted as one whether the runner's answer or the cancellation came first.
                code = grpc.StatusCode.CANCELLED  # the client left, or the server stops
                if call is not None and time.monotonic() >= call.deadline:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    message = "the client's deadline passed before the call was answered"
                    _count_error(DeadlineExceeded.code, message, code, endpoint, request_id)
                raise
            except ServiceError as error:
                code = status_of(error)
                _count_error(error.code, error.message, code, endpoint, request_id)
                context.set_trailing_metadata([("x-request-id", request_id), *trailers(error)])
                await context.abort(code, error.message)
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error", extra={"request_id": request_id})
                metrics.ERRORS.labels("internal", metrics.GRPC).inc()
                await context.abort(code, f"internal error (request id {request_id})")
            finally:
                metrics.REQUEST_LATENCY.labels(metrics.GRPC, endpoint, code.name).observe(
                    time.perf_counter() - started
                )
            raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

        self.handlers[name] = grpc.unary_unary_rpc_method_handler(handle)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Return the handler that serves every method registered."""
        return grpc.method_handlers_generic_handler(self.service, self.handlers)


def _count_error(
    code: str, message: str, status: grpc.StatusCode, endpoint: str, request_id: str
) -> None:
    metrics.ERRORS.labels(code, metrics.GRPC).inc()
    level = logging.ERROR if status is grpc.StatusCode.INTERNAL else logging.INFO
    extra = {"request_id": request_id, "status": status.name, "code": code, "path": endpoint}
    log.log(level, message, extra=extra)
