"""The Open Inference Protocol (KServe V2) REST routes, with Triton's binary tensor data and
classification extensions: the HTTP framing of service/frontend/open_inference.py, which
says what the model takes and gives.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version as package_version

import orjson
from flask import Blueprint, Response, current_app, g, request

from service.errors import (
    InvalidRequest,
    UnsupportedMediaType,
)
from service.frontend import explanations, open_inference
from service.frontend.catalogue import Catalogue
from service.frontend.http import v2_codec
from service.frontend.http.base import (
    authorize,
    json_response,
    lease,
    message_only,
    read_body,
)
from service.frontend.open_inference import EXTENSIONS, OUTPUT
from service.registry import Models, Phase
from service.settings import Settings

PATH_PREFIX = "/v2"
blueprint = Blueprint("v2", __name__, url_prefix=PATH_PREFIX)
# Every error under PATH_PREFIX is answered in this shape (served/frontend/app.py).
error_body = message_only

HEADER_LENGTH = "Inference-Header-Content-Length"
# tritonclient sends its binary bodies with no Content-Type at all.
ACCEPTED_TYPES = ("", "application/json", "application/octet-stream")


def _model_route(suffix: str, method: str) -> Callable:
    """Route a view at /models/<name>{suffix}, with and without /versions/<version>."""

    def register(view: Callable) -> Callable:
        blueprint.add_url_rule(
            f"/models/<name>{suffix}", view_func=view, defaults={"version": None}, methods=[method]
        )
        blueprint.add_url_rule(
            f"/models/<name>/versions/<version>{suffix}", view_func=view, methods=[method]
        )
        return view

    return register


def _models() -> Models:
    return current_app.extensions["models"]


def _manager() -> Catalogue:
    return current_app.extensions["catalogue"]


@blueprint.get("")
def server_metadata() -> Response:
    """Describe the server and the extensions it speaks."""
    body = {"name": "cnn-serving", "version": package_version("cnn-serving")}
    return json_response({**body, "extensions": EXTENSIONS})


@blueprint.get("/health/live")
def live() -> Response:
    """Answer as /healthz: 200 while the process is worth keeping."""
    alive = _manager().alive
    return json_response({"live": alive}, 200 if alive else 503)


@blueprint.get("/health/ready")
def ready() -> Response:
    """Answer as /readyz: 200 while every model takes predictions."""
    is_ready = _manager().ready
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


@_model_route("", "GET")
def model_metadata(name: str, version: str | None) -> Response:
    """Describe the model's inputs and output."""
    served = _models().find(name, version)
    return json_response(open_inference.model_metadata(_models(), served, version is not None))


@_model_route("/ready", "GET")
def model_ready(name: str, version: str | None) -> Response:
    """Tell whether the model (at that version) takes predictions now."""
    serving = _manager().phase in (Phase.READY, Phase.DRAINING)
    ready = open_inference.model_ready(_models(), name, version, serving)
    return json_response({"name": name, "ready": ready}, 200 if ready else 503)


@blueprint.post("/repository/index")
def repository_index() -> Response:
    """List every model version with its state, as Triton's repository index does."""
    try:
        body = orjson.loads(read_body(request) or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
        raise InvalidRequest('the body must be {} or {"ready": true|false}')
    return json_response(open_inference.repository_index(_models(), body.get("ready", False)))


@_model_route("/infer", "POST")
def infer(name: str, version: str | None) -> Response:
    """Run the request's one input through the model; answer the outputs it asks for."""
    settings: Settings = current_app.config["SETTINGS"]
    authorize(request, current_app.config["API_TOKEN"])
    served = lease(name, version)
    if request.mimetype not in ACCEPTED_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {request.mimetype!r} is not supported; use application/json "
            "or application/octet-stream (with Inference-Header-Content-Length)"
        )
    if request.headers.get("Content-Encoding", "identity") != "identity":
        raise UnsupportedMediaType("compressed bodies (Content-Encoding) are not supported")
    document, inputs = v2_codec.parse_request(
        read_body(request), request.headers.get(HEADER_LENGTH)
    )
    requested = v2_codec.requested_outputs(document, OUTPUT)
    explain = v2_codec.parameters(document, "the request").get("explain")
    outputs, explained = open_inference.infer(
        served,
        inputs,
        requested,
        max_images=settings.max_images_per_request,
        deadline=g.deadline,
        request_id=g.request_id,
        explain=explanations.requested(explain),
    )
    info = served.info
    answer: dict[str, object] = {"model_name": info.name, "model_version": info.version}
    if "id" in document:
        answer["id"] = document["id"]
    if explained is not None:
        answer["parameters"] = {"explanations": explained}
    body, header_length = v2_codec.encode_response(
        answer, outputs, [output.binary for output in requested]
    )
    if header_length is None:
        return Response(body, mimetype="application/json")
    response = Response(body, mimetype="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(header_length)
    return response
