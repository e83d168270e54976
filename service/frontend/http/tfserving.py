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

from service.errors import InvalidRequest
from service.frontend.http.base import (
    authorize,
    b64_upload,
    json_response,
    lease,
    message_only,
    read_body,
)
from service.frontend.protocol_rules import check_image_count, ranked
from service.frontend.versions import RemoteVersion
from service.registry import Models, Phase, State
from service.settings import Settings

PATH_PREFIX = "/v1"
blueprint = Blueprint("tfserving", __name__)
# Every error under PATH_PREFIX is answered in this shape (served/frontend/app.py).
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
    name, version, label = parts[0], None, None
    if len(parts) >= 3 and parts[1] == "versions":
        version, parts = parts[2], parts[:1] + parts[3:]
    elif len(parts) >= 3 and parts[1] == "labels":
        label, parts = parts[2], parts[:1] + parts[3:]
    if not name or parts[1:] not in ([], ["metadata"]):
        raise NotFound(f"no TF Serving route /v1/models/{rest}")
    if verb and (parts[1:] or verb not in VERBS):
        raise NotFound(f"no TF Serving method {verb!r}; served: :predict, :classify")
    # The request metrics' endpoint: the route this path stands for, as for the other
    # protocols (a handful of values, never the path itself).
    g.metrics_endpoint = "/v1/models/<name>" + (
        "/versions/<version>" if version else "/labels/<label>" if label else ""
    )
    g.metrics_endpoint += f":{verb}" if verb else "/metadata" if parts[1:] else ""
    allowed = ["POST"] if verb else ["GET", "HEAD"]
    if request.method not in allowed:
        raise MethodNotAllowed(valid_methods=allowed)
    authorize(request, current_app.config["API_TOKEN"])
    if verb:
        served = lease(name, version, label)
        return _predict(served) if verb == "predict" else _classify(served)
    models: Models = current_app.extensions["models"]
    if parts[1:]:
        return json_response(_metadata(models.find(name, version, label)))
    if label is not None:
        version = models.find(name, label=label).info.version
    return json_response(_status(models, name, version))


def _status(models: Models, name: str, version: str | None) -> dict:
    """Describe the model's versions (or one of them) as a GetModelStatusResponse."""
    statuses = [s for s in models.statuses(name) if version in (None, s.version)]
    if not statuses:
        models.find(name, version)  # raises the 404 that names what is served
    draining = current_app.extensions["catalogue"].phase is Phase.DRAINING
    rows = []
    for status in reversed(statuses):  # newest first, as TF Serving lists them
        state, code = status.state.value, "OK"
        if status.state is State.FAILED:
            state, code = "END", "UNKNOWN"
        elif status.state is State.AVAILABLE and draining:
            state = "UNLOADING"
        detail = {"error_code": code, "error_message": status.error}
        rows.append({"version": status.version, "state": state, "status": detail})
    return {"model_version_status": rows}


def _metadata(served: RemoteVersion) -> dict:
    """Describe the model as a GetModelMetadataResponse with one signature_def."""
    info = served.info

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


def _predict(served: RemoteVersion) -> Response:
    document = _request_document()
    if ("instances" in document) == ("inputs" in document):
        raise InvalidRequest('send exactly one of "instances" (row) or "inputs" (columnar)')
    if "instances" in document:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise InvalidRequest('"instances" must be a list, one item per image')
        images = [_unnamed(item, f"instances[{i}]") for i, item in enumerate(instances)]
        return json_response({"predictions": _run(served, images, "instances")})
    columns = _unnamed(document["inputs"], "inputs")
    if not isinstance(columns, list):
        raise InvalidRequest('"inputs" must be a list of images, or {"<input>": [...]}')
    return json_response({"outputs": _run(served, columns, "inputs")})


def _classify(served: RemoteVersion) -> Response:
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
    labels = served.info.labels
    result = []
    for output in _run(served, images, "examples"):
        order = ranked(output)
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


def _run(served: RemoteVersion, images: list, where: str) -> list[list[float]]:
    """Return the probabilities of b64 images or of one float tensor, in order."""
    settings: Settings = current_app.config["SETTINGS"]
    if not images:
        raise InvalidRequest(f'"{where}" holds no image')
    check_image_count(len(images), settings.max_images_per_request)
    if all(isinstance(image, dict) for image in images):
        uploads = [b64_upload(f"{where}[{i}]", image) for i, image in enumerate(images)]
        outputs = served.predict(uploads, deadline=g.deadline, request_id=g.request_id)
    else:
        try:
            batch = np.asarray(images, dtype=np.float32)
        except (ValueError, TypeError):
            raise InvalidRequest(
                f"{where}: each image must be {{'b64': ...}} or a nested list of numbers "
                "of the model's input shape"
            ) from None
        outputs = served.predict_tensor(batch, deadline=g.deadline, request_id=g.request_id)
    return [output.tolist() for output in outputs]
