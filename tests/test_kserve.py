"""The KServe manifests of k8s/kserve: they pass our own schema of KServe's API
(tests/kserve_schema.py) and, for their core/v1 parts, Kubernetes' schemas; KServe would pair
the InferenceService with the runtime; and the runtime runs the service as KServe expects it
(its ports, the model at /mnt/models, readiness) and as k8s/base runs it (image, user,
writable folders, shutdown)."""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings
from tests.kserve_schema import (
    COMPONENT_EXTENSION,
    CONTAINER_FIELDS,
    POD_FIELDS,
    PROTOCOLS,
    SCHEMAS,
)
from tests.test_k8s import (
    ROOT,
    assert_valid_kubernetes,
    by_kind,
    cpus,
    image_environment,
    mounted_volumes,
    port_number,
)

# KServe's conventions (its API reference and documentation): the container the predictor is
# merged into and the model mounted in, and where the storageUri's contents go.
KSERVE_CONTAINER = "kserve-container"
MODEL_MOUNT = "/mnt/models"
# What KServe's webhook accepts as an InferenceService's name (IsvcNameFmt).
ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Storage URI schemes KServe's storage initializer (or, for pvc://, a mount) serves.
STORAGE_SCHEMES = ("pvc://", "s3://", "gs://", "hf://", "http://", "https://", "hdfs://", "oci://")
# Deployment modes in which a predictor gets a plain Deployment and Service (KServe 0.16 calls
# it Standard, older releases RawDeployment): Knative's allows a container one port only.
PLAIN_DEPLOYMENT_MODES = {"Standard", "RawDeployment"}


def kserve() -> dict[str, dict[str, Any]]:
    return by_kind("kserve")


def runtime_container() -> dict[str, Any]:
    (container,) = kserve()["ServingRuntime"]["spec"]["containers"]
    return container


def model_spec() -> dict[str, Any]:
    return kserve()["InferenceService"]["spec"]["predictor"]["model"]


def merge(base: Any, over: Any, key: str = "") -> Any:
    """Merge the model's container fields over the runtime's, as KServe's strategic merge does
    for these: variables by name, maps key by key, anything else replaced."""
    if key == "env":
        return list({var["name"]: var for var in [*base, *over]}.values())
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: merge(base[k], v, k) if k in base else v for k, v in over.items()}}
    return over


def served_container() -> dict[str, Any]:
    """Return the container KServe runs: the runtime's, with the model's fields over it."""
    model_fields = {k: v for k, v in model_spec().items() if k in CONTAINER_FIELDS}
    return merge(runtime_container(), model_fields)


def served_pod() -> dict[str, Any]:
    """Return the pod KServe makes of the runtime's pod fields and the predictor's."""
    predictor = kserve()["InferenceService"]["spec"]["predictor"]
    spec = {k: v for k, v in kserve()["ServingRuntime"]["spec"].items() if k in POD_FIELDS}
    spec |= {k: v for k, v in predictor.items() if k not in COMPONENT_EXTENSION and k != "model"}
    spec["containers"] = [served_container()]
    metadata = {"name": f"{kserve()['InferenceService']['metadata']['name']}-predictor"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def environment() -> dict[str, str]:
    """Return the environment the service runs with: the image's, then the container's."""
    values = image_environment()
    values.update({var["name"]: var["value"] for var in served_container().get("env", [])})
    return values


def resources() -> dict[str, Any]:
    return served_container().get("resources", {})


@functools.cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMAS[kind])
    return jsonschema.Draft202012Validator(SCHEMAS[kind])


def errors(kind: str, manifest: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator(kind).iter_errors(manifest)
    ]


@pytest.mark.parametrize("kind", SCHEMAS)
def test_manifests_pass_our_kserve_schema(kind: str) -> None:
    assert errors(kind, kserve()[kind]) == []


def test_served_pod_passes_the_kubernetes_schemas(tmp_path: Path) -> None:
    # The core/v1 parts in full (our schema names only the fields we use): the pod KServe
    # would make, against Kubernetes' own schemas, unknown fields refused.
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(served_pod()))
    assert_valid_kubernetes(path)


# A slip in each manifest that the schema must refuse: (kind, path, value or DELETE).
DELETE = object()
RUNTIME_CONTAINER = ("spec", "containers", 0)
MODEL = ("spec", "predictor", "model")
REFUSED = [
    ("ServingRuntime", ("metadata", "name"), DELETE),
    ("ServingRuntime", ("spec", "containers"), DELETE),
    ("ServingRuntime", ("spec", "protocolVersion"), "v2"),
    ("ServingRuntime", ("spec", "protocolVersions"), ["v2", "grpc"]),
    ("ServingRuntime", ("spec", "supportedModelFormats", 0, "name"), DELETE),
    ("ServingRuntime", ("spec", "supportedModelFormats", 0, "autoSelect"), "true"),
    ("ServingRuntime", ("spec", "supportedModelFormats", 0, "priority"), 0),
    ("ServingRuntime", ("spec", "supportedModelFormats", 0, "prority"), 1),
    ("ServingRuntime", ("spec", "annotations", "prometheus.io/scrape"), True),
    ("ServingRuntime", (*RUNTIME_CONTAINER, "image"), DELETE),
    ("ServingRuntime", (*RUNTIME_CONTAINER, "ports", 0, "containerPort"), "8080"),
    ("ServingRuntime", (*RUNTIME_CONTAINER, "ports", 1, "name"), "grpc-inference-v2"),
    ("ServingRuntime", (*RUNTIME_CONTAINER, "env", 0, "valu"), "/mnt/models"),
    ("ServingRuntime", (*RUNTIME_CONTAINER, "readinessProbe", "httpGet", "port"), 0),
    ("ServingRuntime", (*RUNTIME_CONTAINER, "securityContext", "runAsUser"), "10001"),
    ("ServingRuntime", (*RUNTIME_CONTAINER, "volumeMount"), []),
    ("InferenceService", ("apiVersion",), "serving.kserve.io/v1alpha1"),
    ("InferenceService", ("spec", "predictor"), DELETE),
    ("InferenceService", ("spec", "predictor", "minReplicas"), "2"),
    ("InferenceService", ("spec", "predictor", "terminationGracePeriod"), 45),
    ("InferenceService", (*MODEL, "storageURI"), "pvc://cnn-models"),
    ("InferenceService", (*MODEL, "storageUri"), "cnn-models"),
    ("InferenceService", (*MODEL, "modelFormat", "name"), DELETE),
    ("InferenceService", (*MODEL, "protocolVersion"), "V2"),
    ("InferenceService", (*MODEL, "resources", "limits", "cpu"), "2 cores"),
]


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    REFUSED,
    ids=[f"{kind}.{'.'.join(map(str, path))}" for kind, path, _ in REFUSED],
)
def test_schema_refuses_slips(kind: str, path: tuple, value: object) -> None:
    # So that passing it means something: each of these small slips is caught.
    manifest = copy.deepcopy(kserve()[kind])
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    assert errors(kind, manifest), f"{'.'.join(map(str, path))}={value!r} passed"


def test_runtime_speaks_v2_over_rest_and_grpc() -> None:
    protocols = kserve()["ServingRuntime"]["spec"]["protocolVersions"]
    assert set(protocols) <= set(PROTOCOLS)
    assert {"v2", "grpc-v2"} <= set(protocols)


def test_runtime_container_routes_rest_and_exposes_grpc_as_h2c() -> None:
    container = runtime_container()
    assert container["name"] == KSERVE_CONTAINER
    served = Settings.from_env(environment())
    assert served.grpc_port, "GRPC_PORT=0 turns gRPC off"
    first, *others = container["ports"]
    # KServe routes its ingress and its Service's port 80 to the first port.
    assert (first["name"], first["containerPort"]) == ("http1", served.port)
    assert [(port["name"], port["containerPort"]) for port in others] == [("h2c", served.grpc_port)]


def test_runtime_points_the_service_at_the_storage_mount() -> None:
    values = environment()
    runtime_env = {var["name"] for var in runtime_container()["env"]}
    known = {field.name.upper() for field in fields(Settings)} | {"PROMETHEUS_MULTIPROC_DIR"}
    assert runtime_env <= known - {"API_TOKEN"}, "unknown setting, or a secret in a manifest"
    served = Settings.from_env(values)
    # A repository: the storageUri names a folder of <model>/<version>/ folders, the models
    # are named by their folders, and the image's MODEL_DIR is cleared.
    assert (served.model_repository, served.model_dir) == (MODEL_MOUNT, "")


def test_probes_ask_readyz_and_healthz_on_the_rest_port() -> None:
    container, port = runtime_container(), Settings.from_env(environment()).port
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert port_number(container, get["port"]) == port
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }


def test_inference_service_gets_the_runtime_it_names() -> None:
    # KServe's rule (ModelSpec.RuntimeSupportsModel): the model's format label, with its
    # version if it gives one, is among the runtime's; the protocol is one it speaks; and a
    # runtime for one model per server (not ModelMesh's multiModel), not disabled.
    runtime, model = kserve()["ServingRuntime"], model_spec()
    spec = runtime["spec"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert not spec.get("multiModel") and not spec.get("disabled")
    fmt = model["modelFormat"]
    label = f"mt:{fmt['name']}" + (f":{fmt['version']}" if "version" in fmt else "")
    labels = set()
    for supported in spec["supportedModelFormats"]:
        labels.add(f"mt:{supported['name']}")
        if "version" in supported:
            labels.add(f"mt:{supported['name']}:{supported['version']}")
    assert label in labels
    assert model["protocolVersion"] in spec["protocolVersions"]


def test_inference_service_runs_as_a_plain_deployment() -> None:
    # Two container ports: Knative (KServe's Serverless mode) refuses more than one.
    assert len(runtime_container()["ports"]) > 1
    annotations = kserve()["InferenceService"]["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] in PLAIN_DEPLOYMENT_MODES


def test_inference_service_serves_the_models_claim() -> None:
    isvc, claim = kserve()["InferenceService"], by_kind("overlays/cpu")["PersistentVolumeClaim"]
    assert ISVC_NAME.fullmatch(isvc["metadata"]["name"])
    uri = model_spec()["storageUri"]
    assert uri.startswith(STORAGE_SCHEMES)
    # The repository k8s/publish trains into; pvc://CLAIM mounts the claim's root.
    assert uri.removeprefix("pvc://").split("/")[0] == claim["metadata"]["name"]


def test_runtime_runs_the_cpu_overlays_image() -> None:
    (served,) = by_kind("overlays/cpu")["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert runtime_container()["image"] == served["image"]
    assert served["image"].endswith(":cpu")


def test_runtime_runs_as_the_base_deployments_user_read_only() -> None:
    # A ServingRuntime has no pod securityContext: the container's holds what the base
    # Deployment sets on its pod and its container.
    context = runtime_container()["securityContext"]
    pod = by_kind("overlays/cpu")["Deployment"]["spec"]["template"]["spec"]
    (base,) = pod["containers"]
    assert pod["securityContext"].items() <= context.items()
    assert base["securityContext"].items() <= context.items()
    user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user and context["runAsUser"] == int(user[1]), "not the image's user"
    assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True


def test_tmp_and_metrics_folder_are_empty_dirs() -> None:
    mounts = mounted_volumes(kserve()["ServingRuntime"]["spec"], runtime_container())
    for path in ("/tmp", environment()["PROMETHEUS_MULTIPROC_DIR"]):
        assert "emptyDir" in mounts[path][1], path
    # KServe mounts the model there; nothing of the runtime's may hide it.
    assert MODEL_MOUNT not in mounts


def test_scrape_annotations_point_at_metrics_on_the_rest_port() -> None:
    annotations = kserve()["ServingRuntime"]["spec"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == Settings.from_env(environment()).port


def test_pods_are_not_selected_by_the_base_service() -> None:
    # KServe copies the InferenceService's labels and the runtime's spec.labels onto its pods.
    base = by_kind("overlays/cpu")
    labels = {
        **kserve()["InferenceService"]["metadata"].get("labels", {}),
        **kserve()["ServingRuntime"]["spec"].get("labels", {}),
    }.items()
    for selector in (
        base["Service"]["spec"]["selector"],
        base["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        base["Deployment"]["spec"]["selector"]["matchLabels"],
    ):
        assert not selector.items() <= labels, selector


def test_shutdown_waits_out_the_drain_and_the_last_requests() -> None:
    command = runtime_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    served = Settings.from_env(environment())
    grace = kserve()["InferenceService"]["spec"]["predictor"]["terminationGracePeriodSeconds"]
    assert served.drain_s < pause < pause + served.graceful_timeout_s < grace


def test_workers_and_threads_fit_the_cpu_limit() -> None:
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources()[kind]), kind
    limit = cpus(resources()["limits"]["cpu"])
    values = environment()
    # Unset (0) they follow the container's CPU quota; set, they must fit it.
    for name in ("WORKERS", "TF_INTRA_OP_THREADS"):
        assert int(values.get(name) or 0) in (0, limit), name
