"""grpc.health.v1.Health, meaning what /readyz means, so that a Kubernetes `grpc:` probe works.

The service "" (and "inference.GRPCInferenceService") is the server: SERVING while /readyz
would say 200. A model's name is that model: SERVING while some version of it takes
predictions. Any other name is NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch), as the health
protocol says. A Watch looks again every half second, on a request thread for a moment; at
most WATCHES of them at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2 as pb

from service.errors import ModelNotFound, Overloaded
from service.frontend import open_inference
from service.frontend.catalogue import Catalogue
from service.frontend.grpc.calls import Call, Methods
from service.frontend.grpc.inference import SERVICE as INFERENCE_SERVICE
from service.frontend.versions import RemoteVersion
from service.registry import Models, Phase

SERVICE = "grpc.health.v1.Health"
SERVING = pb.HealthCheckResponse.SERVING
NOT_SERVING = pb.HealthCheckResponse.NOT_SERVING
UNKNOWN = pb.HealthCheckResponse.SERVICE_UNKNOWN
# How often a Watch looks again, and how many may watch at once.
WATCH_S = 0.5
WATCHES = 64


class HealthService:
    """Check, List and Watch over one front end's view of the runners."""

    def __init__(self, catalogue: Catalogue, models: Models[RemoteVersion]) -> None:
        """Answer from `catalogue` and `models`."""
        self.catalogue = catalogue
        self.models = models
        self._watchers = threading.BoundedSemaphore(WATCHES)
        self._closed = threading.Event()
        self._threads: ThreadPoolExecutor | None = None

    def methods(self, threads: ThreadPoolExecutor) -> Methods:
        """Return Check, List and Watch, run on `threads`."""
        self._threads = threads
        methods = Methods(SERVICE, token="", timeout_s=1.0, threads=threads)
        methods.unary("Check", pb.HealthCheckRequest, self.check, before=self.catalogue.refresh)
        methods.unary("List", pb.HealthListRequest, self.list, before=self.catalogue.refresh)
        methods.handlers["Watch"] = grpc.unary_stream_rpc_method_handler(
            self.watch,
            request_deserializer=pb.HealthCheckRequest.FromString,
            response_serializer=pb.HealthCheckResponse.SerializeToString,
        )
        return methods

    def close(self) -> None:
        """End every Watch (the server is stopping)."""
        self._closed.set()

    def status(self, service: str) -> int:
        """Return `service`'s serving status (SERVICE_UNKNOWN for what is not served)."""
        if service in ("", INFERENCE_SERVICE):
            return SERVING if self.catalogue.ready else NOT_SERVING
        serving = self.catalogue.phase is Phase.READY
        try:
            ready = open_inference.model_ready(self.models, service, None, serving)
        except ModelNotFound:
            return UNKNOWN
        return SERVING if ready else NOT_SERVING

    def check(self, request: pb.HealthCheckRequest, call: Call) -> pb.HealthCheckResponse:
        """Answer the service's status now."""
        status = self.status(request.service)
        if status == UNKNOWN:
            raise ModelNotFound(f"no service or model {request.service!r} is served")
        return pb.HealthCheckResponse(status=status)

    def list(self, request: pb.HealthListRequest, call: Call) -> pb.HealthListResponse:
        """Answer the status of the server and of every model."""
        response = pb.HealthListResponse()
        for service in ["", INFERENCE_SERVICE, *self.models.names()]:
            response.statuses[service].status = self.status(service)
        return response

    async def watch(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.HealthCheckResponse]:
        """Send the service's status now and at each change, until the client leaves."""
        if not self._watchers.acquire(blocking=False):
            error = Overloaded("too many health watches at once; use Check, or retry later")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, error.message)
        loop = asyncio.get_running_loop()

        def look() -> int:
            self.catalogue.refresh()
            return self.status(request.service)

        try:
            last = None
            while not self._closed.is_set():
                status = await loop.run_in_executor(self._threads, look)
                if status != last:
                    yield pb.HealthCheckResponse(status=status)
                    last = status
                await asyncio.sleep(WATCH_S)
        finally:
            self._watchers.release()
