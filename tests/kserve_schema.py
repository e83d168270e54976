"""Our own JSON Schema (draft 2020-12) of the KServe resources that k8s/kserve holds: a
serving.kserve.io/v1alpha1 ServingRuntime and a serving.kserve.io/v1beta1 InferenceService.

Written by hand from KServe's API reference (kserve.github.io/website, "Control Plane API")
and Kubernetes' core/v1 reference, for the fields these manifests use; it is not KServe's CRD.
Every object at KServe's level (spec, predictor, model, a supported model format) and every
core/v1 object we write (container, port, probe, ...) refuses fields it does not name, so a
misspelled field (storageURI, protocolVersion for protocolVersions) fails, as it does under
`kubectl apply`'s strict validation. KServe fields these manifests do not use are named with
a loose type where the README suggests them (tolerations, serviceAccountName, ...); any other
is refused: add it here, from the API reference, with the manifest that starts using it.
tests/test_kserve.py also checks the core/v1 parts against Kubernetes' own schemas.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
# KServe's protocol versions (the API reference's InferenceServiceProtocol).
PROTOCOLS = ["v1", "v2", "grpc-v1", "grpc-v2"]


def obj(properties: Schema, *required: str, **extra: Any) -> Schema:
    """Return an object schema that refuses fields other than `properties`."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    return schema | ({"required": list(required)} if required else {}) | extra


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
OBJECT: Schema = {"type": "object"}
ARRAY: Schema = {"type": "array"}
STRINGS = array(STRING)
STRING_MAP: Schema = {"type": "object", "additionalProperties": STRING}
NON_NEGATIVE: Schema = {"type": "integer", "minimum": 0}
AT_LEAST_ONE: Schema = {"type": "integer", "minimum": 1}
# A DNS-1123 label: the names of objects, containers and volumes.
DNS_LABEL: Schema = {
    "type": "string",
    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    "maxLength": 63,
}
# An IANA service name, as a container port's name: 15 characters at most, a letter in it.
PORT_NAME: Schema = {
    "type": "string",
    "pattern": r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    "maxLength": 15,
}
PORT_NUMBER: Schema = {"type": "integer", "minimum": 1, "maximum": 65535}
# A probe's or handler's port: a number, or the name of one of the container's ports.
PORT: Schema = {"oneOf": [PORT_NUMBER, PORT_NAME]}
# A resource quantity: "2", "500m", "2Gi", "1e3", or a plain number.
QUANTITY: Schema = {
    "oneOf": [
        {"type": "number", "minimum": 0},
        {
            "type": "string",
            "pattern": r"^\+?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$",
        },
    ]
}
QUANTITIES: Schema = {"type": "object", "additionalProperties": QUANTITY}

METADATA = obj(
    {"name": DNS_LABEL, "namespace": DNS_LABEL, "labels": STRING_MAP, "annotations": STRING_MAP},
    "name",
)

# --- core/v1: the parts of a Container these manifests write, with their types ----------------

ENV_VAR = obj(
    {"name": {"type": "string", "minLength": 1}, "value": STRING, "valueFrom": OBJECT}, "name"
)
CONTAINER_PORT = obj(
    {
        "name": PORT_NAME,
        "containerPort": PORT_NUMBER,
        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
        "hostPort": PORT_NUMBER,
        "hostIP": STRING,
    },
    "containerPort",
)
HTTP_GET = obj(
    {
        "path": {"type": "string", "pattern": "^/"},
        "port": PORT,
        "host": STRING,
        "scheme": {"enum": ["HTTP", "HTTPS"]},
        "httpHeaders": ARRAY,
    },
    "port",
)
EXEC = obj({"command": array(STRING, minItems=1)}, "command")
TCP_SOCKET = obj({"port": PORT, "host": STRING}, "port")
GRPC = obj({"port": PORT_NUMBER, "service": STRING}, "port")
# A probe does one of these; a lifecycle hook one of its own.
PROBE_ACTIONS = {"httpGet": HTTP_GET, "exec": EXEC, "tcpSocket": TCP_SOCKET, "grpc": GRPC}
PROBE = obj(
    {
        **PROBE_ACTIONS,
        "initialDelaySeconds": NON_NEGATIVE,
        "periodSeconds": AT_LEAST_ONE,
        "timeoutSeconds": AT_LEAST_ONE,
        "successThreshold": AT_LEAST_ONE,
        "failureThreshold": AT_LEAST_ONE,
        "terminationGracePeriodSeconds": AT_LEAST_ONE,
    },
    oneOf=[{"required": [action]} for action in PROBE_ACTIONS],
)
HOOK_ACTIONS = {
    "exec": EXEC,
    "httpGet": HTTP_GET,
    "tcpSocket": TCP_SOCKET,
    "sleep": obj({"seconds": NON_NEGATIVE}, "seconds"),
}
HOOK = obj(HOOK_ACTIONS, oneOf=[{"required": [action]} for action in HOOK_ACTIONS])
SECURITY_CONTEXT = obj(
    {
        "runAsNonRoot": BOOLEAN,
        "runAsUser": NON_NEGATIVE,
        "runAsGroup": NON_NEGATIVE,
        "readOnlyRootFilesystem": BOOLEAN,
        "allowPrivilegeEscalation": BOOLEAN,
        "privileged": BOOLEAN,
        "capabilities": obj({"add": STRINGS, "drop": STRINGS}),
        "seccompProfile": obj(
            {
                "type": {"enum": ["RuntimeDefault", "Unconfined", "Localhost"]},
                "localhostProfile": STRING,
            },
            "type",
        ),
        "appArmorProfile": OBJECT,
        "seLinuxOptions": OBJECT,
        "procMount": STRING,
    }
)
VOLUME_MOUNT = obj(
    {
        "name": DNS_LABEL,
        "mountPath": {"type": "string", "pattern": "^/"},
        "readOnly": BOOLEAN,
        "subPath": STRING,
        "subPathExpr": STRING,
        "mountPropagation": STRING,
        "recursiveReadOnly": STRING,
    },
    "name",
    "mountPath",
)
# Every field of core/v1 Container (Kubernetes 1.30), typed where these manifests use it.
CONTAINER_FIELDS: Schema = {
    "name": DNS_LABEL,
    "image": {"type": "string", "minLength": 1},
    "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
    "command": STRINGS,
    "args": STRINGS,
    "workingDir": STRING,
    "env": array(ENV_VAR),
    "envFrom": array(OBJECT),
    "ports": array(CONTAINER_PORT),
    "resources": obj({"requests": QUANTITIES, "limits": QUANTITIES, "claims": ARRAY}),
    "startupProbe": PROBE,
    "readinessProbe": PROBE,
    "livenessProbe": PROBE,
    "lifecycle": obj({"postStart": HOOK, "preStop": HOOK, "stopSignal": STRING}),
    "securityContext": SECURITY_CONTEXT,
    "volumeMounts": array(VOLUME_MOUNT),
    "volumeDevices": ARRAY,
    "resizePolicy": ARRAY,
    "restartPolicy": STRING,
    "terminationMessagePath": STRING,
    "terminationMessagePolicy": {"enum": ["File", "FallbackToLogsOnError"]},
    "stdin": BOOLEAN,
    "stdinOnce": BOOLEAN,
    "tty": BOOLEAN,
}
# A volume: a name and one source; an emptyDir is checked, any other source is an object.
VOLUME: Schema = {
    "type": "object",
    "properties": {
        "name": DNS_LABEL,
        "emptyDir": obj({"medium": {"enum": ["", "Memory"]}, "sizeLimit": QUANTITY}),
    },
    "additionalProperties": OBJECT,
    "required": ["name"],
    "minProperties": 2,
    "maxProperties": 2,
}
# Pod-level fields that KServe takes (ServingRuntimePodSpec, and PredictorSpec's PodSpec).
POD_FIELDS: Schema = {
    "volumes": array(VOLUME),
    "nodeSelector": STRING_MAP,
    "affinity": OBJECT,
    "tolerations": array(OBJECT),
    "imagePullSecrets": array(OBJECT),
}

# --- serving.kserve.io/v1alpha1 ServingRuntime ---------------------------------------------

SUPPORTED_MODEL_FORMAT = obj(
    {
        "name": {"type": "string", "minLength": 1},
        "version": STRING,
        "autoSelect": BOOLEAN,
        # Among runtimes that auto-select a format, the highest wins; 1 is the least.
        "priority": AT_LEAST_ONE,
    },
    "name",
)
RUNTIME_SPEC = obj(
    {
        "supportedModelFormats": array(SUPPORTED_MODEL_FORMAT, minItems=1),
        "protocolVersions": array({"enum": PROTOCOLS}, minItems=1, uniqueItems=True),
        "multiModel": BOOLEAN,
        "disabled": BOOLEAN,
        "containers": array(obj(CONTAINER_FIELDS, "name", "image"), minItems=1),
        # Put on the pods KServe makes with this runtime.
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        **POD_FIELDS,
        # ModelMesh's fields: named so that they are known, not used here.
        "grpcEndpoint": STRING,
        "grpcDataEndpoint": STRING,
        "httpDataEndpoint": STRING,
        "replicas": NON_NEGATIVE,
        "builtInAdapter": OBJECT,
        "storageHelper": OBJECT,
    },
    "containers",
)

# --- serving.kserve.io/v1beta1 InferenceService --------------------------------------------

# ModelSpec: the model's format, its runtime and storage, over a core/v1 Container whose
# fields KServe merges into the runtime's container (its name is the runtime's).
MODEL = obj(
    {
        **CONTAINER_FIELDS,
        "modelFormat": obj({"name": {"type": "string", "minLength": 1}, "version": STRING}, "name"),
        "runtime": DNS_LABEL,
        "runtimeVersion": STRING,
        "protocolVersion": {"enum": PROTOCOLS},
        "storageUri": {"type": "string", "pattern": r"^[a-z][a-z0-9+.-]*://."},
        "storage": OBJECT,
    },
    # KServe picks the runtime by the format, and checks a named runtime supports it.
    "modelFormat",
)
# ComponentExtensionSpec: how KServe deploys and scales the predictor.
COMPONENT_EXTENSION: Schema = {
    "minReplicas": NON_NEGATIVE,
    "maxReplicas": NON_NEGATIVE,
    "scaleTarget": AT_LEAST_ONE,
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": NON_NEGATIVE,
    "timeout": NON_NEGATIVE,
    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    "deploymentStrategy": OBJECT,
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
    "logger": OBJECT,
    "batcher": OBJECT,
}
# PredictorSpec: the model, the component's extension, and the pod's own fields.
PREDICTOR = obj(
    {
        "model": MODEL,
        **COMPONENT_EXTENSION,
        **POD_FIELDS,
        "terminationGracePeriodSeconds": NON_NEGATIVE,
        "automountServiceAccountToken": BOOLEAN,
        "enableServiceLinks": BOOLEAN,
        "serviceAccountName": DNS_LABEL,
        "priorityClassName": STRING,
    },
    "model",
)
ISVC_SPEC = obj({"predictor": PREDICTOR, "transformer": OBJECT, "explainer": OBJECT}, "predictor")


def resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return {
        "$schema": DRAFT,
        "title": f"{api_version} {kind} (the fields k8s/kserve uses)",
        **obj(
            {
                "apiVersion": {"const": api_version},
                "kind": {"const": kind},
                "metadata": METADATA,
                "spec": spec,
            },
            "apiVersion",
            "kind",
            "metadata",
            "spec",
        ),
    }


SCHEMAS = {
    "ServingRuntime": resource("serving.kserve.io/v1alpha1", "ServingRuntime", RUNTIME_SPEC),
    "InferenceService": resource("serving.kserve.io/v1beta1", "InferenceService", ISVC_SPEC),
}
