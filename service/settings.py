"""Service configuration, read from the environment in one place."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from model_folder.errors import ModelFolderError
from model_folder.repository import VersionPolicy

# cgroup v2's CPU quota of this process's container: "<quota> <period>", or "max <period>".
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
# Seconds a stopping worker is given, past its last request's lifetime, to finish exiting.
GRACEFUL_MARGIN_S = 5
# Keras backends a worker serves on (service/runner/runtime.py).
SERVING_BACKENDS = ("tensorflow", "jax")
# The model served when neither MODEL_DIR nor MODEL_REPOSITORY is set: `make run`'s demo.
DEFAULT_MODEL_DIR = "models/shapes"


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; the env var of a field is its name in upper case."""

    # One model: a model folder, or a folder of its numbered versions (default models/shapes).
    model_dir: str = ""
    # A folder of models, each sub-folder one model (named by it): a model folder, or a folder
    # of numbered versions. Set this or MODEL_DIR, not both.
    model_repository: str = ""
    # Which versions of each model to serve: latest, latest:N, all or specific:V1,V2; a model's
    # config.json may say otherwise for that model.
    model_version_policy: str = "latest"
    # Seconds between scans for new, changed or removed versions; 0: only on SIGHUP.
    model_poll_s: float = 5.0
    # Keras's backend in the workers: tensorflow or jax. The same model files load into
    # either, and the answers agree within 1e-5.
    keras_backend: str = "tensorflow"
    # Address and port gunicorn binds.
    host: str = "0.0.0.0"
    port: int = 8080
    # Port of a separate /metrics listener (on HOST); 0: /metrics is served on PORT.
    metrics_port: int = 0
    # Port of the gRPC front end (the Open Inference Protocol's GRPCInferenceService and
    # grpc.health.v1, on HOST); 0: no gRPC.
    grpc_port: int = 8081
    # Gunicorn worker processes: they read requests and decode images, and hold no model;
    # 0: one per CPU core this process may use (its affinity and cgroup quota).
    workers: int = 0
    # Request threads per worker: they parse and decode uploads while the batcher runs the model.
    threads: int = 16
    # Largest batch one forward pass takes; batches are padded up to powers of two below it.
    # 0: the device's default (32 on a CPU, 128 on a GPU); any other value is used as given.
    max_batch_size: int = 0
    # Longest wait after a batch's first image for more images, and only while more are arriving.
    max_batch_delay_ms: float = 5.0
    # Images that may wait in a runner's queue of one version; past this, requests are shed
    # with 503.
    max_queue: int = 512
    # Deadline of a request, from arrival to answer; a client may ask for less. A request whose
    # batch is already running when it passes waits up to this long again for that batch.
    request_timeout_s: float = 10.0
    # Largest request body accepted, in bytes.
    max_body_bytes: int = 16 * 1024 * 1024
    # Largest image accepted, in pixels (width x height), checked before decoding.
    max_image_pixels: int = 25_000_000
    # Most images one request may carry.
    max_images_per_request: int = 64
    # Seconds a worker keeps serving after SIGTERM, answering /readyz with 503, before it stops.
    drain_s: float = 1.0
    # TensorFlow intra-op threads per runner; 0: the usable cores shared out among the runners.
    tf_intra_op_threads: int = 0
    # Bearer token required on /predict and /v1/models; empty means no authentication.
    api_token: str = ""
    # File holding the bearer token (e.g. a mounted Kubernetes secret); wins over api_token.
    api_token_file: str = ""
    # Python logging level of the service's JSON logs.
    log_level: str = "INFO"
    # Grad-CAM explanations (?explain=gradcam) a runner computes at once, on threads of their
    # own beside the batchers; as many again may wait, and more are refused with 503.
    explain_concurrency: int = 1
    # An answer whose top-class probability is below this counts as low-confidence
    # (cnn_low_confidence_total).
    low_confidence: float = 0.5
    # Classes per model version with a cnn_predicted_class_total series of their own: the
    # most frequent; the rest are counted as class="other".
    class_series: int = 50
    # Runner processes, each holding every model and batching for all workers; 0: one per
    # visible GPU, else one.
    runners: int = 0
    # A stand-in for Keras in the runners, "module:function" loading a classifier from
    # (folder, settings, name, version): for tests and benchmarks only, never in production.
    runtime: str = ""

    def __post_init__(self) -> None:
        positive = (
            "threads",
            "max_queue",
            "max_body_bytes",
            "max_image_pixels",
            "max_images_per_request",
            "request_timeout_s",
            "class_series",
            "explain_concurrency",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.upper()} must be positive, got {getattr(self, name)}")
        for name in (
            "workers",
            "max_batch_size",
            "max_batch_delay_ms",
            "drain_s",
            "tf_intra_op_threads",
            "model_poll_s",
            "runners",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name.upper()} must not be negative")
        if not 0 < self.port < 65536:
            raise SettingsError(f"PORT must be in 1..65535, got {self.port}")
        if not 0 <= self.metrics_port < 65536 or self.metrics_port == self.port:
            raise SettingsError(f"METRICS_PORT must be 0 or a port other than PORT ({self.port})")
        if not 0 <= self.grpc_port < 65536 or (
            self.grpc_port and self.grpc_port in (self.port, self.metrics_port)
        ):
            raise SettingsError(
                "GRPC_PORT must be 0 or a port other than PORT and METRICS_PORT "
                f"({self.port}, {self.metrics_port})"
            )
        if not 0 < self.low_confidence <= 1:
            raise SettingsError(f"LOW_CONFIDENCE must be in (0, 1], got {self.low_confidence}")
        if self.max_images_per_request > self.max_queue:
            raise SettingsError("MAX_IMAGES_PER_REQUEST must not exceed MAX_QUEUE")
        if self.model_dir and self.model_repository:
            raise SettingsError(
                "MODEL_DIR and MODEL_REPOSITORY are both set; set MODEL_DIR for one model or "
                "MODEL_REPOSITORY for a folder of models"
            )
        if self.keras_backend not in SERVING_BACKENDS:
            raise SettingsError(
                f"KERAS_BACKEND must be one of {', '.join(SERVING_BACKENDS)}, "
                f"got {self.keras_backend!r}"
            )
        try:
            VersionPolicy.parse(self.model_version_policy)
        except ModelFolderError as exc:
            raise SettingsError(str(exc)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from environment variables, then apply explicit overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field.name, raw, type(getattr(cls, field.name)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def as_env(self) -> dict[str, str]:
        """Return the settings as environment variables, for the processes the CLI starts."""
        return {f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

    @property
    def model_path(self) -> Path:
        """Return MODEL_REPOSITORY, else MODEL_DIR (or its default)."""
        return Path(self.model_repository or self.model_dir or DEFAULT_MODEL_DIR)

    @property
    def version_policy(self) -> VersionPolicy:
        """Return the version policy of models whose config.json names none."""
        return VersionPolicy.parse(self.model_version_policy)

    @property
    def worker_count(self) -> int:
        """Return the number of gunicorn workers to run (resolving 0 to the usable cores)."""
        return self.workers or usable_cores()

    @property
    def runner_count(self) -> int:
        """Return the number of runners (resolving 0 to the visible GPUs, or one)."""
        return self.runners or max(1, len(visible_gpus()))

    @property
    def tf_threads(self) -> int:
        """Return TensorFlow's intra-op threads per runner (resolving 0 to a share of cores)."""
        return self.tf_intra_op_threads or max(1, usable_cores() // self.runner_count)

    @property
    def running_batch_grace_s(self) -> float:
        """Return how long past its deadline a request waits for its batch already running."""
        return self.request_timeout_s

    @property
    def request_lifetime_s(self) -> float:
        """Return the longest an accepted request can take: its deadline, then the grace."""
        return self.request_timeout_s + self.running_batch_grace_s

    @property
    def graceful_timeout_s(self) -> int:
        """Return gunicorn's graceful timeout: the drain, then the last request's lifetime."""
        return math.ceil(self.drain_s + self.request_lifetime_s + GRACEFUL_MARGIN_S)

    @property
    def bearer_token(self) -> str:
        """Return the configured API token, read from api_token_file when one is set."""
        if not self.api_token_file:
            return self.api_token
        path = Path(self.api_token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SettingsError(f"API_TOKEN_FILE {path}: cannot be read ({reason})") from None
        if not token:
            raise SettingsError(f"API_TOKEN_FILE {path}: the file is empty")
        return token


def _parse(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return kind(raw.strip()) if kind is not str else raw
    except ValueError:
        raise SettingsError(f"{name.upper()}={raw!r} is not a valid {kind.__name__}") from None


def usable_cores() -> int:
    """Return the cores this process may use: its affinity (taskset, cpusets), capped by its
    cgroup's CPU quota (a container's limit), not all of the machine's."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path(CGROUP_CPU_MAX).read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def visible_gpus() -> list[str]:
    """Return the NVIDIA GPUs this process may use, as CUDA numbers them, without a runtime:
    CUDA_VISIBLE_DEVICES if set, else the driver's device files."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu for gpu in visible.split(",") if gpu.strip() and gpu.strip() != "-1"]
    # CUDA numbers the cards a process sees from 0, whatever the driver's device files are
    # called (in a container, /dev/nvidia3 may be the one card).
    found = list(Path("/dev").glob("nvidia[0-9]*"))
    return [str(ordinal) for ordinal in range(len(found))]
