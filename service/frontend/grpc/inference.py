"""inference.GRPCInferenceService: the Open Inference Protocol's gRPC methods.

Health, metadata and inference, as the REST routes of service/frontend/http/v2.py answer
them, through the same catalogue, leases, runners and rules (service/frontend/
open_inference.py); only the framing is gRPC's. Triton's other methods (shared memory,
statistics, model control) are not served: grpcio answers them UNIMPLEMENTED.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as package_version

from tritonclient.grpc import service_pb2 as pb

from service.errors import ModelNotFound
from service.frontend import explanations, open_inference
from service.frontend.catalogue import Catalogue
from service.frontend.grpc import tensors
from service.frontend.grpc.calls import Call, Methods
from service.frontend.versions import RemoteVersion
from service.registry import Models, Phase
from service.settings import Settings

SERVICE = "inference.GRPCInferenceService"


class InferenceService:
    """The methods of GRPCInferenceService over one front end's view of the runners."""

    def __init__(
        self, settings: Settings, catalogue: Catalogue, models: Models[RemoteVersion]
    ) -> None:
        """Answer from `catalogue` and `models`, within `settings`' limits."""
        self.settings = settings
        self.catalogue = catalogue
        self.models = models

    def methods(self, threads: ThreadPoolExecutor) -> Methods:
        """Return the service's methods, run on `threads`, ready to be added to a server."""
        settings = self.settings
        methods = Methods(SERVICE, settings.bearer_token, settings.request_timeout_s, threads)
        # Before any lookup: a version a runner has published is seen by every call after.
        refresh = self.catalogue.refresh
        methods.unary("ServerLive", pb.ServerLiveRequest, self.server_live)
        methods.unary("ServerReady", pb.ServerReadyRequest, self.server_ready, before=refresh)
        methods.unary("ModelReady", pb.ModelReadyRequest, self.model_ready, before=refresh)
        methods.unary("ServerMetadata", pb.ServerMetadataRequest, self.server_metadata)
        methods.unary("ModelMetadata", pb.ModelMetadataRequest, self.model_metadata, before=refresh)
        methods.unary(
            "RepositoryIndex", pb.RepositoryIndexRequest, self.repository_index, before=refresh
        )
        methods.unary(
            "ModelInfer", pb.ModelInferRequest, self.model_infer, authorized=True, before=refresh
        )
        return methods

    def server_live(self, request: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        """Answer as /healthz: live while the process is worth keeping."""
        return pb.ServerLiveResponse(live=self.catalogue.alive)

    def server_ready(self, request: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        """Answer as /readyz: ready while every model takes predictions."""
        return pb.ServerReadyResponse(ready=self.catalogue.ready)

    def model_ready(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        """Tell whether the model (at that version) takes predictions now: not, if it is not
        served (REST's 404, which tritonclient's HTTP client reads as not ready too)."""
        serving = self.catalogue.phase in (Phase.READY, Phase.DRAINING)
        try:
            ready = open_inference.model_ready(
                self.models, request.name, request.version or None, serving
            )
        except ModelNotFound:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    def server_metadata(
        self, request: pb.ServerMetadataRequest, call: Call
    ) -> pb.ServerMetadataResponse:
        """Describe the server and the extensions it speaks."""
        return pb.ServerMetadataResponse(
            name="cnn-serving",
            version=package_version("cnn-serving"),
            extensions=open_inference.EXTENSIONS,
        )

    def model_metadata(
        self, request: pb.ModelMetadataRequest, call: Call
    ) -> pb.ModelMetadataResponse:
        """Describe the model's inputs and output (labels and device: see the REST twin)."""
        served = self.models.find(request.name, request.version or None)
        described = open_inference.model_metadata(self.models, served, bool(request.version))
        response = pb.ModelMetadataResponse(
            name=described["name"], versions=described["versions"], platform=described["platform"]
        )
        for key in ("inputs", "outputs"):
            for tensor in described[key]:  # type: ignore[attr-defined]
                getattr(response, key).add(**tensor)
        return response

    def repository_index(
        self, request: pb.RepositoryIndexRequest, call: Call
    ) -> pb.RepositoryIndexResponse:
        """List every model version with its state, as Triton's repository index does."""
        response = pb.RepositoryIndexResponse()
        for row in open_inference.repository_index(self.models, request.ready):
            response.models.add(**row)
        return response

    def model_infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        """Run the request's one input through the model; answer the outputs it asks for."""
        served = self.models.acquire(request.model_name, request.model_version or None)
        try:
            outputs, explained = open_inference.infer(
                served,
                tensors.inputs(request),
                tensors.requested_outputs(request),
                max_images=self.settings.max_images_per_request,
                deadline=call.deadline,
                request_id=call.request_id,
                explain=explanations.requested(tensors.explain_parameter(request)),
            )
        finally:
            self.models.release(served)
            served.metrics.request.observe(time.perf_counter() - call.started)
        info = served.info
        response = tensors.response(request, info.name, info.version, outputs)
        if explained is not None:
            # A parameter holds a scalar: the explanations go as one JSON string.
            response.parameters["explanations"].string_param = json.dumps(explained)
        return response
