"""The OpenAPI 3.1 document of every route: built here, beside the routes it describes.

Path parameters name the models served, filled in per request from `Models`, so a client
(or a fuzzer) meets the real handlers rather than 404s.
"""

from __future__ import annotations

import math
from importlib.metadata import version as package_version

from model_folder.files import ModelInfo
from service.frontend.http.openapi_schemas import (
    B64_IMAGE,
    BINARY,
    EXAMPLE_PNG_B64,
    NUMBER_LIST,
    SCHEMAS,
)
from service.registry import Models

# Each protocol's error body (service/frontend/http/base.py answer_errors shapes them).
_PREDICT_ERROR = {"$ref": "#/components/schemas/PredictError"}
_MESSAGE_ERROR = {"$ref": "#/components/schemas/MessageError"}
_HTML: dict = {"text/html": {"schema": {}}}

_STATUS_TEXT = {
    400: "Bad request: bad JSON, parameter, tensor or image",
    401: "The bearer token is missing or wrong (API_TOKEN is set)",
    404: "No such model or version",
    408: "The body did not arrive within the request's deadline",
    413: "The body, an image or the image count is over its limit",
    415: "The Content-Type is not one the route takes",
    500: "The forward pass failed (only this batch)",
    503: "Not ready, or overloaded; ask again after Retry-After",
    504: "The deadline passed before the images were run",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}}


def document(models: Models, metrics: bool, assets: list[str], page_files: list[str]) -> dict:
    """Return the OpenAPI document, its model names and versions those of `models`.

    `metrics` tells whether this app serves /metrics (not when METRICS_PORT is set);
    `assets` are the files of the /docs page, `page_files` those of the page at /.
    """
    loaded = [served.info for served in models.available()]
    names = sorted({info.name for info in loaded})
    name = _path_parameter("name", names)
    version = _path_parameter("version", sorted({info.version for info in loaded}))
    labels = sorted({label for model in names for label in models.labels(model)})
    label = _path_parameter("label", labels)
    paths: dict[str, dict] = {
        "/": {"get": _get("A page to try the models in a browser", _HTML)},
        "/page/{file}": {"get": _file("A file of the page at /", "file", page_files)},
        "/healthz": {"get": _get("Liveness", _json({"type": "object"}), {503: _readiness()})},
        "/readyz": {"get": _get("Readiness", _readiness(), {503: _readiness()})},
        "/metrics": {"get": _get("Prometheus metrics", {"text/plain": {"schema": {}}})},
        "/openapi.json": {"get": _get("This document", _json({"type": "object"}))},
        "/docs": {"get": _get("This document as a page", _HTML)},
        "/docs/{asset}": {"get": _file("A file of the /docs page", "asset", assets)},
        "/predict": {"post": _predict(names, sorted({info.version for info in loaded}))},
        "/v2": {"get": _get("V2 server metadata", _json({"type": "object"}))},
        "/v2/health/live": {"get": _get("V2 liveness", _flag("live"), {503: _flag("live")})},
        "/v2/health/ready": {"get": _get("V2 readiness", _flag("ready"), {503: _flag("ready")})},
        "/v2/repository/index": {"post": _v2_repository_index()},
    }
    for prefix, parameters in (("", [name]), ("/versions/{version}", [name, version])):
        base = "/v2/models/{name}" + prefix
        paths[base] = {"get": _v2_model_get("V2 model metadata", "V2ModelMetadata", parameters)}
        paths[base + "/ready"] = {"get": _v2_ready(parameters)}
        paths[base + "/infer"] = {"post": _v2_infer(parameters, loaded)}
        base = "/v1/models/{name}" + prefix
        paths[base] = {"get": _tf_get("TF Serving model status", "TFModelStatus", parameters)}
        paths[base + "/metadata"] = {
            "get": _tf_get("TF Serving model metadata", "TFModelMetadata", parameters)
        }
        paths[base + ":predict"] = {"post": _tf_predict(parameters)}
        paths[base + ":classify"] = {"post": _tf_classify(parameters)}
    if labels:
        base = "/v1/models/{name}/labels/{label}"
        parameters = [name, label]
        paths[base] = {"get": _tf_get("TF Serving model status", "TFModelStatus", parameters)}
        paths[base + "/metadata"] = {
            "get": _tf_get("TF Serving model metadata", "TFModelMetadata", parameters)
        }
        paths[base + ":predict"] = {"post": _tf_predict(parameters)}
        paths[base + ":classify"] = {"post": _tf_classify(parameters)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "cnn-serving", "version": package_version("cnn-serving")},
        "paths": {path: item for path, item in paths.items() if metrics or path != "/metrics"},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _file(summary: str, parameter: str, files: list[str]) -> dict:
    responses = _responses({"*/*": {"schema": {}}}, {404: _json(_PREDICT_ERROR)})
    parameters = [_path_parameter(parameter, files)]
    return {"summary": summary, "parameters": parameters, "responses": responses}


def _path_parameter(name: str, served: list[str]) -> dict:
    schema: dict = {"type": "string", "enum": served} if served else {"type": "string"}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _readiness() -> dict:
    return _json({"$ref": "#/components/schemas/Readiness"})


def _flag(key: str) -> dict:
    return _json({"type": "object", "properties": {key: {"type": "boolean"}}, "required": [key]})


def _responses(content: dict, statuses: dict[int, dict]) -> dict:
    """Return a 200 of `content` and each status's answer, Retry-After on a 503 error."""
    responses = {"200": {"description": "OK", "content": content}}
    for status, answer in statuses.items():
        response = {"description": _STATUS_TEXT.get(status, "Not ready"), "content": answer}
        if status == 503 and answer.get("application/json", {}).get("schema") in (
            _PREDICT_ERROR,
            _MESSAGE_ERROR,
        ):
            response["headers"] = _RETRY_AFTER
        responses[str(status)] = response
    return responses


def _get(summary: str, content: dict, statuses: dict[int, dict] | None = None) -> dict:
    return {"summary": summary, "responses": _responses(content, statuses or {})}


def _errors(error: dict, statuses: tuple[int, ...]) -> dict[int, dict]:
    return {status: _json(error) for status in statuses}


def _post(summary: str, parameters: list, body: dict, responses: dict) -> dict:
    timeout = {
        "name": "timeout",
        "in": "query",
        "schema": {"type": "number", "exclusiveMinimum": 0},
        "description": "The request's deadline in seconds, capped by REQUEST_TIMEOUT_S",
    }
    return {
        "summary": summary,
        "parameters": [*parameters, timeout],
        "requestBody": {"required": True, "content": body},
        "responses": responses,
        "security": [{}, {"bearer": []}],
    }


_INFER_STATUSES = (400, 401, 404, 408, 413, 415, 500, 503, 504)


def _predict(names: list[str], versions: list[str]) -> dict:
    top_k = {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1}}
    explain = {"name": "explain", "in": "query", "schema": {"type": "string", "enum": ["gradcam"]}}
    model = {"name": "model", "in": "query", "schema": {"type": "string", "enum": names}}
    version = {"name": "version", "in": "query", "schema": {"type": "string", "enum": versions}}
    image = {"schema": BINARY}
    instances = {
        "type": "object",
        "properties": {"instances": {"type": "array", "items": B64_IMAGE, "minItems": 1}},
        "required": ["instances"],
        "example": {"instances": [{"b64": EXAMPLE_PNG_B64}]},
    }
    form = {
        "type": "object",
        "properties": {"image": BINARY},
        "required": ["image"],
    }
    body = {
        "multipart/form-data": {"schema": form},
        "image/png": image,
        "image/jpeg": image,
        "application/json": {"schema": instances},
    }
    responses = _responses(
        _json({"$ref": "#/components/schemas/Prediction"}),
        _errors(_PREDICT_ERROR, _INFER_STATUSES),
    )
    timing = {
        "schema": {"type": "string"},
        "description": "Milliseconds spent reading the body, in the model (decoding, queue, "
        "forward pass) and in all: read;dur=0.41, model;dur=6.20, total;dur=7.05",
    }
    responses["200"]["headers"] = {"Server-Timing": timing}
    query = [top_k, explain, model, version] if names else [top_k, explain]
    return _post("Classify images", query, body, responses)


def _v2_repository_index() -> dict:
    body = {
        "type": "object",
        "properties": {"ready": {"type": "boolean"}},
        "additionalProperties": False,
    }
    responses = _responses(
        _json({"$ref": "#/components/schemas/V2RepositoryIndex"}), {400: _json(_MESSAGE_ERROR)}
    )
    return {
        "summary": "Every model version with its state (Triton's repository index)",
        "requestBody": {"required": False, "content": _json(body)},
        "responses": responses,
    }


def _v2_model_get(summary: str, schema: str, parameters: list) -> dict:
    content = _json({"$ref": f"#/components/schemas/{schema}"})
    return {**_get(summary, content, _errors(_MESSAGE_ERROR, (404, 503))), "parameters": parameters}


def _v2_ready(parameters: list) -> dict:
    ready = {"type": "object", "properties": {"name": {"type": "string"}, "ready": {}}}
    not_ready = _json({"anyOf": [ready, _MESSAGE_ERROR]})
    responses = _responses(_json(ready), {404: _json(_MESSAGE_ERROR), 503: not_ready})
    return {"summary": "V2 model readiness", "parameters": parameters, "responses": responses}


def _v2_infer(parameters: list, loaded: list[ModelInfo]) -> dict:
    header = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "schema": {"type": "integer", "minimum": 0},
        "description": "Length of the JSON header before the binary tensor data",
    }
    body = {
        "application/json": {
            "schema": {"$ref": "#/components/schemas/V2InferRequest"},
            "examples": {
                f"{info.name} pixels": {"value": _v2_pixels(info.input_shape)} for info in loaded
            },
        },
        "application/octet-stream": {"schema": BINARY},
    }
    responses = _responses(
        {
            "application/json": {"schema": {"$ref": "#/components/schemas/V2InferResponse"}},
            "application/octet-stream": {"schema": BINARY},
        },
        _errors(_MESSAGE_ERROR, _INFER_STATUSES),
    )
    return _post("V2 inference", [*parameters, header], body, responses)


def _v2_pixels(input_shape: tuple[int, ...]) -> dict:
    """Return an inference request of one mid-grey FP32 image of the model's input shape."""
    shape = [1, *input_shape]
    data = [0.5] * math.prod(shape)
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": shape, "data": data}]}


# A name werkzeug's <path:rest> cannot match (one with a newline) is no route at all, but
# its 404 is still in TF Serving's shape: the path decides the shape (service/frontend/app.py).
_TF_NOT_FOUND = _json(_MESSAGE_ERROR)


def _tf_get(summary: str, schema: str, parameters: list) -> dict:
    content = _json({"$ref": f"#/components/schemas/{schema}"})
    statuses = {**_errors(_MESSAGE_ERROR, (401, 503)), 404: _TF_NOT_FOUND}
    return {
        **_get(summary, content, statuses),
        "parameters": parameters,
        "security": [{}, {"bearer": []}],
    }


def _tf_errors() -> dict[int, dict]:
    return {**_errors(_MESSAGE_ERROR, _INFER_STATUSES), 404: _TF_NOT_FOUND}


def _tf_predict(parameters: list) -> dict:
    images = {"type": "array", "items": {"anyOf": [B64_IMAGE, {"type": "array"}]}}
    body = {
        "type": "object",
        "properties": {
            "signature_name": {"type": "string", "example": "serving_default"},
            "instances": images,
            "inputs": {"anyOf": [images, {"type": "object"}]},
        },
        "example": {"instances": [{"b64": EXAMPLE_PNG_B64}]},
    }
    answer = {
        "type": "object",
        "properties": {
            "predictions": {"type": "array", "items": NUMBER_LIST},
            "outputs": {"type": "array", "items": NUMBER_LIST},
        },
    }
    responses = _responses(_json(answer), _tf_errors())
    return _post("TF Serving predict", parameters, _json(body), responses)


def _tf_classify(parameters: list) -> dict:
    example = {"type": "object", "properties": {"image": B64_IMAGE}, "required": ["image"]}
    body = {
        "type": "object",
        "properties": {"examples": {"type": "array", "items": example}},
        "required": ["examples"],
        "example": {"examples": [{"image": {"b64": EXAMPLE_PNG_B64}}]},
    }
    label_probability = {
        "type": "array",
        "items": {"type": ["string", "number"]},
        "minItems": 2,
        "maxItems": 2,
    }
    result = {"type": "array", "items": {"type": "array", "items": label_probability}}
    answer = {"type": "object", "properties": {"result": result}, "required": ["result"]}
    responses = _responses(_json(answer), _tf_errors())
    return _post("TF Serving classify", parameters, _json(body), responses)
