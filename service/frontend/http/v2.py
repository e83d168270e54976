"""The Open Inference Protocol (KServe V2) REST routes, with Triton's binary tensor data and
classification extensions.

The model takes one of two inputs: "image", BYTES [N] of encoded images (decoded and resized
as for /predict), or "pixels", UINT8 or FP32 [N, H, W, C] at the model's input size (UINT8
scaled as the model folder says, FP32 taken as the model's input values). It gives one
output, "probabilities", FP32 [N, classes] of softmax probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version as package_version

import numpy as np
import orjson
from flask import Blueprint, Response, current_app, g, request

from service.errors import (
    InvalidRequest,
    UnsupportedMediaType,
)
from service.frontend.catalogue import Catalogue
from service.frontend.http import v2_codec
from service.frontend.http.base import (
    authorize,
    check_image_count,
    json_response,
    lease,
    message_only,
    ranked,
    read_body,
)
from service.frontend.http.v2_codec import InputTensor, OutputTensor
from service.frontend.versions import RemoteVersion, Upload
from service.registry import Models, State
from service.settings import Settings

PATH_PREFIX = "/v2"
blueprint = Blueprint("v2", __name__, url_prefix=PATH_PREFIX)
# Every error under PATH_PREFIX is answered in this shape (served/frontend/app.py).
error_body = message_only

IMAGE, PIXELS, OUTPUT = "image", "pixels", "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]
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


# Triton's names for the states of a repository index.
_INDEX_STATES = {
    State.AVAILABLE: "READY",
    State.LOADING: "LOADING",
    State.UNLOADING: "UNLOADING",
    State.END: "UNAVAILABLE",
    State.FAILED: "UNAVAILABLE",
}


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
    info = _models().find(name, version).info
    versions = [
        status.version for status in _models().statuses(name) if status.state is State.AVAILABLE
    ]
    return json_response(
        {
            "name": info.name,
            "versions": versions if version is None else [info.version],
            "platform": "keras",
            "inputs": [
                {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                {"name": PIXELS, "datatype": "UINT8", "shape": [-1, *info.input_shape]},
            ],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(info.labels)]}],
            # As MLServer's model metadata carries them: what a client shows beside the
            # probabilities (their labels, in output order) and where the model runs.
            "parameters": {"labels": list(info.labels), "device": info.device},
        }
    )


@_model_route("/ready", "GET")
def model_ready(name: str, version: str | None) -> Response:
    """Tell whether the model (at that version) takes predictions now."""
    known = [s for s in _models().statuses(name) if version in (None, s.version)]
    if not known:
        _models().find(name, version)  # raises the 404 that names what is served
    ready = any(s.state is State.AVAILABLE and s.served and s.served.alive for s in known)
    ready = ready and _manager().phase.value in ("ready", "draining")
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
    rows = []
    for status in _models().statuses():
        if body.get("ready") and status.state is not State.AVAILABLE:
            continue
        row = {"name": status.model, "version": status.version}
        row["state"] = _INDEX_STATES[status.state]
        row["reason"] = status.error or ("unloaded" if status.state is State.END else "")
        rows.append(row)
    return json_response(rows)


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
    if len(inputs) != 1:
        raise InvalidRequest(f"send one input, {IMAGE!r} or {PIXELS!r}; got {len(inputs)}")
    count = len(inputs[0].value)
    check_image_count(count, settings.max_images_per_request)
    probabilities = np.stack(_predict(served, inputs[0]))
    outputs = [_output(served, probabilities, output) for output in requested]
    info = served.info
    answer: dict[str, object] = {"model_name": info.name, "model_version": info.version}
    if "id" in document:
        answer["id"] = document["id"]
    body, header_length = v2_codec.encode_response(
        answer, outputs, [output.binary for output in requested]
    )
    if header_length is None:
        return Response(body, mimetype="application/json")
    response = Response(body, mimetype="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(header_length)
    return response


def _predict(served: RemoteVersion, tensor: InputTensor) -> list[np.ndarray]:
    if not len(tensor.value):
        raise InvalidRequest(f"input {tensor.name!r} holds no image")
    if tensor.name == IMAGE:
        if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
            raise InvalidRequest(f"input {IMAGE!r} must be BYTES [N] of encoded images")
        assert isinstance(tensor.value, list)
        uploads = [
            Upload(f"image {i + 1} ({IMAGE}[{i}])", data) for i, data in enumerate(tensor.value)
        ]
        return served.predict(uploads, deadline=g.deadline, request_id=g.request_id)
    if tensor.name == PIXELS:
        if not isinstance(tensor.value, np.ndarray):
            raise InvalidRequest(f"input {PIXELS!r} must be UINT8 or FP32 [N, H, W, C]")
        return served.predict_tensor(tensor.value, deadline=g.deadline, request_id=g.request_id)
    raise InvalidRequest(f"unknown input {tensor.name!r}; the model takes {IMAGE!r} or {PIXELS!r}")


def _output(
    served: RemoteVersion, probabilities: np.ndarray, output: v2_codec.RequestedOutput
) -> OutputTensor:
    if output.name != OUTPUT:
        raise InvalidRequest(f"unknown output {output.name!r}; the model gives {OUTPUT!r}")
    if not output.classification:
        return OutputTensor(OUTPUT, "FP32", list(probabilities.shape), probabilities)
    labels = served.info.labels
    k = min(output.classification, len(labels))
    order = ranked(probabilities, k)
    # As Triton writes them: "<value>:<index>:<label>", the value as C's %f.
    classes = [
        f"{row[i]:f}:{i}:{labels[i]}".encode()
        for row, indices in zip(probabilities, order, strict=True)
        for i in indices
    ]
    return OutputTensor(OUTPUT, "BYTES", [len(probabilities), k], classes)
