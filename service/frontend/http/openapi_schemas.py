"""The schemas of the OpenAPI document's bodies: each protocol's requests, answers, errors."""

from __future__ import annotations

# An 8x8 PNG, the example image of every body that carries one.
EXAMPLE_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8ISfHgA0wYRUdtBIA0MoBFD5jqJkAAAAAS"
    "UVORK5CYII="
)
BINARY = {"type": "string", "format": "binary"}
B64_IMAGE = {
    "type": "object",
    "properties": {"b64": {"type": "string", "contentEncoding": "base64"}},
    "required": ["b64"],
    "example": {"b64": EXAMPLE_PNG_B64},
}
NUMBER_LIST = {"type": "array", "items": {"type": "number"}}

SCHEMAS: dict[str, dict] = {
    "PredictError": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                "required": ["code", "message"],
            }
        },
        "required": ["error"],
    },
    "MessageError": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    },
    "Readiness": {
        "type": "object",
        "properties": {
            "status": {
                "enum": ["starting", "ready", "draining", "failed", "batcher_stopped", "no_model"]
            },
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "state": {"enum": ["LOADING", "AVAILABLE", "UNLOADING", "END", "FAILED"]},
                        "input_shape": {"type": "array", "items": {"type": "integer"}},
                        "classes": {"type": "integer"},
                        "device": {"type": "string"},
                        "error": {"type": "string"},
                    },
                    "required": ["name", "version", "state"],
                },
            },
            "error": {"type": "string"},
        },
        "required": ["status"],
    },
    "Prediction": {
        "type": "object",
        "properties": {
            "model": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                "required": ["name", "version"],
            },
            "classes": {"type": "array", "items": {"type": "string"}},
            "predictions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string"},
                        "probability": {"type": "number"},
                        "probabilities": NUMBER_LIST,
                        "top": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "label": {"type": "string"},
                                    "probability": {"type": "number"},
                                },
                                "required": ["label", "probability"],
                            },
                        },
                        "explanation": {
                            "description": "With ?explain=gradcam: the Grad-CAM heatmap of "
                            "the top class, a grayscale PNG at the model's input size",
                            "type": "object",
                            "properties": {
                                "method": {"type": "string", "enum": ["gradcam"]},
                                "layer": {"type": "string"},
                                "class": {"type": "string"},
                                "heatmap": {"type": "string", "contentEncoding": "base64"},
                            },
                            "required": ["method", "layer", "class", "heatmap"],
                        },
                    },
                    "required": ["label", "probability", "probabilities", "top"],
                },
            },
        },
        "required": ["model", "classes", "predictions"],
    },
    "V2Tensor": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "examples": ["image", "pixels", "probabilities"]},
            "datatype": {"type": "string", "examples": ["BYTES", "UINT8", "FP32"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
        "required": ["name", "datatype", "shape"],
    },
    "V2InferRequest": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                    "required": ["name"],
                },
            },
        },
        "required": ["inputs"],
    },
    "V2InferResponse": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
        },
        "required": ["model_name", "model_version", "outputs"],
    },
    "V2ModelMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
            "parameters": {
                "type": "object",
                "properties": {
                    "labels": {"type": "array", "items": {"type": "string"}},
                    "device": {"type": "string"},
                },
                "required": ["labels", "device"],
            },
        },
        "required": ["name", "versions", "platform", "inputs", "outputs", "parameters"],
    },
    "TFModelStatus": {
        "type": "object",
        "properties": {
            "model_version_status": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "version": {"type": "string"},
                        "state": {"enum": ["LOADING", "AVAILABLE", "UNLOADING", "END"]},
                        "status": {
                            "type": "object",
                            "properties": {
                                "error_code": {"type": "string"},
                                "error_message": {"type": "string"},
                            },
                            "required": ["error_code", "error_message"],
                        },
                    },
                    "required": ["version", "state", "status"],
                },
            }
        },
        "required": ["model_version_status"],
    },
    "V2RepositoryIndex": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"enum": ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]},
                "reason": {"type": "string"},
            },
            "required": ["name", "version", "state", "reason"],
        },
    },
    "TFModelMetadata": {
        "type": "object",
        "properties": {"model_spec": {"type": "object"}, "metadata": {"type": "object"}},
        "required": ["model_spec", "metadata"],
    },
}
