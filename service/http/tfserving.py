"""TF Serving's REST API (api_rest.md): model status, metadata, :predict and :classify.

One signature, "serving_default", with two alternative inputs: "image_bytes" (DT_STRING,
each {"b64": ...} an encoded image, decoded and resized as for /predict) and "image"
(DT_FLOAT [-1, H, W, C], nested lists taken as the model's input values, unscaled, as TF
Serving feeds a float input). A request sends one of them; the output is "probabilities".
"""

from __future__ import annotations

import numpy as np
import orjson
from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from service.errors import InvalidRequest, PayloadTooLarge
from service.http.base import (
    authorize,
    b64_upload,
    json_response,
    message_only,
    read_body,
)
from service.inference import Models, ModelService, Status
from service.settings import Settings

PATH_PREFIX = "/v1"
blueprint = Blueprint("tfserving", __name__)
# Every error under PATH_PREFIX is answered in this shape (service/app.py).
error_body = message_only

SIGNATURE = "serving_default"
BYTES_INPUT, TENSOR_INPUT, OUTPUT = "image_bytes", "image", "probabilities"
EXAMPLE_FEATURE = "image"  # :classify examples carry {"image": {"b64": ...}}, as api_rest.md's
VERBS = {"predict", "classify"}


@blueprint.route("/v1/models/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def dispatch(rest: str) -> Response:
    """Route a /v1/models/... request by hand: the ":verb" suffix is no path segment."""
    path, _, verb = rest.partition(":")
    parts = path.split("/")
    name, version = parts[0], None
    if len(parts) >= 3 and parts[1] == "versions":
        version, parts = parts[2], parts[:1] + parts[3:]
    if not name or parts[1:] not in ([], ["metadata"]):
        raise NotFound(f"no TF Serving route /v1/models/{rest} (version labels are not served)")
    if verb and (parts[1:] or verb not in VERBS):
        raise NotFound(f"no TF Serving method {verb!r}; served: :predict, :classify")
    # The request metrics' endpoint: the route this path stands for, as for the other
    # protocols (a handful of values, never the path itself).
    g.metrics_endpoint = "/v1/models/<name>" + ("/versions/<version>" if version else "")
    g.metrics_endpoint += f":{verb}" if verb else "/metadata" if parts[1:] else ""
    allowed = ["POST"] if verb else ["GET", "HEAD"]
    if request.method not in allowed:
        raise MethodNotAllowed(valid_methods=allowed)
    authorize(request, current_app.config["API_TOKEN"])
    models: Models = current_app.extensions["models"]
    service = models.find(name, version)
    if verb == "predict":
        return _predict(service)
    if verb == "classify":
        return _classify(service)
    return json_response(_metadata(service) if parts[1:] else _status(service))


def _status(service: ModelService) -> dict:
    """Describe the served version as a GetModelStatusResponse."""
    assert service.classifier is not None
    state, code, message = "AVAILABLE", "OK", ""
    if service.status is Status.STARTING:
        state = "LOADING"
    elif service.status is Status.DRAINING:
        state = "UNLOADING"
    elif not service.ready:
        state, code, message = "END", "UNAVAILABLE", str(service.readiness()["status"])
    status = {"error_code": code, "error_message": message}
    version = service.classifier.info.version
    return {"model_version_status": [{"version": version, "state": state, "status": status}]}


def _metadata(service: ModelService) -> dict:
    """Describe the model as a GetModelMetadataResponse with one signature_def."""
    assert service.classifier is not None
    info = service.classifier.info

    def tensor(name: str, dtype: str, shape: list[int]) -> dict:
        dims = [{"size": str(size), "name": ""} for size in shape]
        return {"dtype": dtype, "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": name}

    signature = {
        "inputs": {
            BYTES_INPUT: tensor(BYTES_INPUT, "DT_STRING", [-1]),
            TENSOR_INPUT: tensor(TENSOR_INPUT, "DT_FLOAT", [-1, *info.input_shape]),
        },
        "outputs": {OUTPUT: tensor(OUTPUT, "DT_FLOAT", [-1, len(info.labels)])},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": info.name, "signature_name": "", "version": info.version},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
    }


def _predict(service: ModelService) -> Response:
    document = _request_document()
    if ("instances" in document) == ("inputs" in document):
        raise InvalidRequest('send exactly one of "instances" (row) or "inputs" (columnar)')
    if "instances" in document:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise InvalidRequest('"instances" must be a list, one item per image')
        images = [_unnamed(item, f"instances[{i}]") for i, item in enumerate(instances)]
        return json_response({"predictions": _run(service, images, "instances")})
    columns = _unnamed(document["inputs"], "inputs")
    if not isinstance(columns, list):
        raise InvalidRequest('"inputs" must be a list of images, or {"<input>": [...]}')
    return json_response({"outputs": _run(service, columns, "inputs")})


def _classify(service: ModelService) -> Response:
    examples = _request_document().get("examples")
    if not isinstance(examples, list):
        raise InvalidRequest(
            f'"examples" must be a list of {{"{EXAMPLE_FEATURE}": {{"b64": ...}}}}'
        )
    images = []
    for i, example in enumerate(examples):
        if not isinstance(example, dict) or EXAMPLE_FEATURE not in example:
            raise InvalidRequest(f'examples[{i}] has no "{EXAMPLE_FEATURE}" feature')
        images.append(example[EXAMPLE_FEATURE])
    assert service.classifier is not None
    labels = service.classifier.info.labels
    result = []
    for output in _run(service, images, "examples"):
        order = np.argsort(-np.asarray(output), kind="stable")
        result.append([[labels[k], output[k]] for k in order])
    return json_response({"result": result})


def _request_document() -> dict:
    """Return the request's JSON object, refusing any signature but the default."""
    try:
        document = orjson.loads(read_body(request))
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest("the JSON body must be an object")
    signature = document.get("signature_name") or SIGNATURE
    if signature != SIGNATURE:
        raise InvalidRequest(f"no signature {signature!r}; served: {SIGNATURE!r}")
    return document


def _unnamed(value: object, where: str) -> object:
    """Return the value of a {"<input name>": value} object, or `value` unnamed."""
    if isinstance(value, dict) and "b64" not in value:
        if len(value) != 1 or next(iter(value)) not in (BYTES_INPUT, TENSOR_INPUT):
            raise InvalidRequest(
                f"{where}: name one input, {BYTES_INPUT!r} or {TENSOR_INPUT!r}; got {list(value)}"
            )
        return next(iter(value.values()))
    return value


def _run(service: ModelService, images: list, where: str) -> list[list[float]]:
    """Return the probabilities of b64 images or of one float tensor, in order."""
    settings: Settings = current_app.config["SETTINGS"]
    if not images:
        raise InvalidRequest(f'"{where}" holds no image')
    if len(images) > settings.max_images_per_request:
        limit = settings.max_images_per_request
        raise PayloadTooLarge(f"{len(images)} images in one request; the limit is {limit}")
    if all(isinstance(image, dict) for image in images):
        uploads = [b64_upload(f"{where}[{i}]", image) for i, image in enumerate(images)]
        outputs = service.predict(uploads, deadline=g.deadline)
    else:
        try:
            batch = np.asarray(images, dtype=np.float32)
        except (ValueError, TypeError):
            raise InvalidRequest(
                f"{where}: each image must be {{'b64': ...}} or a nested list of numbers "
                "of the model's input shape"
            ) from None
        outputs = service.predict_tensor(batch, deadline=g.deadline)
    return [output.tolist() for output in outputs]
