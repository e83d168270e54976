"""POST /predict: read the uploads and parameters, have the version asked for answer, shape it."""

from __future__ import annotations

import time

import numpy as np
import orjson
from flask import Blueprint, Request, Response, current_app, g, request

from service.errors import InvalidRequest, UnsupportedMediaType
from service.frontend import explanations
from service.frontend.http.base import (
    authorize,
    b64_upload,
    json_response,
    lease,
    number_parameter,
    read_body,
)
from service.frontend.protocol_rules import check_image_count, ranked
from service.frontend.versions import RemoteVersion, Upload
from service.settings import Settings

blueprint = Blueprint("predict", __name__)

DEFAULT_TOP_K = 5
QUERY_PARAMETERS = ("top_k", "timeout", "model", "version", "explain")
ACCEPTED_TYPES = "multipart/form-data, image/*, application/json"


@blueprint.post("/predict")
def predict() -> Response:
    """Classify the request's images and return one prediction per image, in order."""
    settings: Settings = current_app.config["SETTINGS"]
    authorize(request, current_app.config["API_TOKEN"])
    top_k = _top_k(request)
    explain = explanations.requested(request.args.get("explain"))
    served = lease(request.args.get("model") or None, request.args.get("version") or None)
    read_at = time.perf_counter()
    uploads = read_uploads(request, settings.max_images_per_request)
    predict_at = time.perf_counter()
    if explain:
        probabilities, explanation = served.predict_explained(uploads, g.deadline, g.request_id)
    else:
        probabilities = served.predict(uploads, deadline=g.deadline, request_id=g.request_id)
    answered_at = time.perf_counter()
    body = prediction_body(served, probabilities, top_k)
    if explain:
        for prediction, about in zip(
            body["predictions"],
            explanations.described(explanation, served.info.labels),
            strict=True,
        ):
            prediction["explanation"] = about
    response = json_response(body)
    # The standard Server-Timing header: where the time went, for any client to show.
    response.headers["Server-Timing"] = server_timing(
        read=predict_at - read_at,
        model=answered_at - predict_at,
        total=time.perf_counter() - g.get("started", read_at),
    )
    return response


def server_timing(**durations_s: float) -> str:
    """Return a Server-Timing header value of named durations (seconds), in milliseconds."""
    return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in durations_s.items())


def prediction_body(served: RemoteVersion, outputs: list[np.ndarray], top_k: int) -> dict:
    """Shape the model's outputs as the /predict response contract."""
    info = served.info
    labels = info.labels
    k = min(top_k, len(labels))
    predictions = []
    for output in outputs:
        order = ranked(output, k)
        probabilities = output.tolist()
        predictions.append(
            {
                "label": labels[order[0]],
                "probability": probabilities[order[0]],
                "probabilities": probabilities,
                "top": [{"label": labels[i], "probability": probabilities[i]} for i in order],
            }
        )
    return {
        "model": {"name": info.name, "version": info.version},
        "classes": list(labels),
        "predictions": predictions,
    }


def read_uploads(req: Request, max_images: int) -> list[Upload]:
    """Return the request's images from a multipart form, a raw image body or TF-style JSON."""
    mimetype = req.mimetype
    if mimetype == "multipart/form-data":
        uploads = [
            Upload(f"image {i + 1} (part {name!r})", part.read())
            for i, (name, part) in enumerate(req.files.items(multi=True))
        ]
        if not uploads:
            raise InvalidRequest("the multipart form has no file part (use -F image=@file.jpg)")
    elif mimetype.startswith("image/"):
        uploads = [Upload("image 1 (request body)", read_body(req))]
    elif mimetype == "application/json":
        uploads = _json_instances(read_body(req))
    elif not mimetype and not req.content_length and not req.headers.get("Transfer-Encoding"):
        raise InvalidRequest(f"the request has no image; send one as {ACCEPTED_TYPES}")
    else:
        raise UnsupportedMediaType(
            f"Content-Type {mimetype or '(none)'!r} is not supported; use {ACCEPTED_TYPES}"
        )
    check_image_count(len(uploads), max_images)
    return uploads


def _json_instances(body: bytes) -> list[Upload]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest('the JSON body must be an object: {"instances": [{"b64": ...}]}')
    instances = document.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidRequest('"instances" must be a non-empty list of {"b64": "<base64>"}')
    return [b64_upload(f"image {i + 1} (instances[{i}])", item) for i, item in enumerate(instances)]


def _top_k(req: Request) -> int:
    unknown = sorted(set(req.args) - set(QUERY_PARAMETERS))
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter {unknown[0]!r}; accepted: {', '.join(QUERY_PARAMETERS)}"
        )
    top_k = int(number_parameter(req.args.get("top_k"), "top_k", int, DEFAULT_TOP_K))
    if top_k < 1:
        raise InvalidRequest(f"top_k must be at least 1, got {top_k}")
    return top_k
