"""Service configuration, read from the environment in one place."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
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


def doc(meaning: str, *, default_doc: str | None = None) -> dict[str, str]:
    """Return a Settings field's metadata: what the field means, and, where its literal default
    alone would mislead (0 or empty standing for a value worked out at start), the default
    column's text. Both are Markdown for docs/configuration.md, which service/settings_docs.py
    makes of them: links are relative to docs/."""
    return {"doc": meaning} if default_doc is None else {"doc": meaning, "default_doc": default_doc}


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; the env var of a field is its name in upper case.

    Each field carries its documentation in its metadata (see `doc`): what it means, and where
    the literal default alone would mislead, what that default amounts to. The configuration
    reference (docs/configuration.md) is generated from it: `python -m service.settings_docs`.
    """

    model_dir: str = field(
        default="",
        metadata=doc(
            "one model: a model folder, or a folder of its numbered versions (`1/`, `2/`, ...)",
            default_doc=f"(empty): `{DEFAULT_MODEL_DIR}`, unless `MODEL_REPOSITORY` is set",
        ),
    )
    model_repository: str = field(
        default="",
        metadata=doc(
            "a folder of models, one sub-folder each, named by its model: a model folder, or a "
            "folder of numbered versions (see "
            "[Model versions](models.md#model-versions-and-hot-reload)); set this or "
            "`MODEL_DIR`, not both"
        ),
    )
    model_version_policy: str = field(
        default="latest",
        metadata=doc(
            "which versions of each model to serve: `latest`, `latest:N`, `all` or "
            "`specific:V1,V2` (e.g. `specific:1,3`); a model's `config.json` may say otherwise "
            "for that model"
        ),
    )
    model_poll_s: float = field(
        default=5.0,
        metadata=doc(
            "seconds between scans for new, changed or removed versions; `0`: only on SIGHUP"
        ),
    )
    keras_backend: str = field(
        default="tensorflow",
        metadata=doc(
            "Keras's backend in the runners: `tensorflow`, or `jax` (one `jax.jit`-compiled "
            "`stateless_call` per padded batch size, compiled ahead of time before ready; no "
            "TensorFlow imported; on a CPU without XLA's YNNPACK fusions, see "
            "[Performance](performance.md#levers-tried-in-the-second-round)). The same model "
            "folder loads into either, and the answers agree within 1e-5 "
            "(`tests/test_backends.py`)"
        ),
    )
    host: str = field(
        default="0.0.0.0",
        metadata=doc("address to bind: of the HTTP front end, the gRPC one and `METRICS_PORT`"),
    )
    port: int = field(default=8080, metadata=doc("port of the HTTP front end (gunicorn)"))
    metrics_port: int = field(
        default=0,
        metadata=doc(
            "serve `/metrics` on this port of `HOST` instead (all workers merged, from the "
            "gunicorn master); `0`: on `PORT`"
        ),
    )
    grpc_port: int = field(
        default=8081,
        metadata=doc(
            "port of the gRPC front end ([gRPC](api.md#grpc): the Open Inference Protocol's "
            "`GRPCInferenceService` and `grpc.health.v1`, on `HOST`); `0`: no gRPC"
        ),
    )
    workers: int = field(
        default=0,
        metadata=doc(
            "gunicorn worker processes: they read requests and decode images, and hold no model",
            default_doc="`0`: one per usable core (affinity, capped by the cgroup's CPU quota)",
        ),
    )
    threads: int = field(
        default=16,
        metadata=doc(
            "request threads per worker: they parse and decode uploads while the runners run "
            "the model"
        ),
    )
    max_batch_size: int = field(
        default=0,
        metadata=doc(
            "most images in one forward pass; batches are padded up to powers of two below it; "
            "any value but `0` is used as given, on either device",
            default_doc="`0`: 32 on a CPU, 128 on a GPU",
        ),
    )
    max_batch_delay_ms: float = field(
        default=5.0,
        metadata=doc(
            "longest a batch waits after its first image for more, and only while more are "
            "arriving (another request is being decoded)"
        ),
    )
    max_queue: int = field(
        default=512,
        metadata=doc(
            "images that may wait in a runner's queue of one version; beyond, requests are shed "
            "with 503 and `Retry-After`"
        ),
    )
    request_timeout_s: float = field(
        default=10.0,
        metadata=doc(
            "deadline of a request, from when the app sees it: the body read, queue admission "
            "and the wait for a batch all count against it; a client may ask for less. A "
            "request whose batch is already running at its deadline waits up to this long "
            "again for that batch"
        ),
    )
    max_body_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=doc("largest request body accepted, in bytes (16 MiB)"),
    )
    max_image_pixels: int = field(
        default=25_000_000,
        metadata=doc("largest image accepted, in pixels (width x height), checked before decoding"),
    )
    max_images_per_request: int = field(
        default=64,
        metadata=doc("most images one request may carry; at most `MAX_QUEUE`"),
    )
    drain_s: float = field(
        default=1.0,
        metadata=doc(
            "seconds a worker keeps serving after SIGTERM, answering `/readyz` with 503, "
            "before it stops"
        ),
    )
    tf_intra_op_threads: int = field(
        default=0,
        metadata=doc(
            "TensorFlow intra-op threads per runner",
            default_doc="`0`: the usable cores shared out among the runners",
        ),
    )
    api_token: str = field(
        default="",
        metadata=doc(
            "bearer token required to predict (`/predict`, `/v1/models/...`, "
            "`/v2/models/.../infer`, gRPC `ModelInfer`); empty: no authentication"
        ),
    )
    api_token_file: str = field(
        default="",
        metadata=doc(
            "file holding the bearer token (e.g. a mounted Kubernetes secret); wins over "
            "`API_TOKEN`; read at start, and a missing or empty file stops `cnn-serve`"
        ),
    )
    log_level: str = field(
        default="INFO",
        metadata=doc("Python logging level of the service's JSON log lines on stderr"),
    )
    explain_concurrency: int = field(
        default=1,
        metadata=doc(
            "Grad-CAM explanations (`?explain=gradcam`) a runner computes at once, on threads "
            "of their own beside the batchers; as many again may wait, and more are refused "
            "with 503"
        ),
    )
    low_confidence: float = field(
        default=0.5,
        metadata=doc(
            "an answer whose top class's probability is below this counts as low-confidence "
            "(`cnn_low_confidence_total`); in (0, 1]"
        ),
    )
    class_series: int = field(
        default=50,
        metadata=doc(
            "classes per model version with a `cnn_predicted_class_total` series of their own: "
            'the most frequent; the rest are counted as `class="other"`'
        ),
    )
    runners: int = field(
        default=0,
        metadata=doc(
            "runner processes, each holding every model and batching for all workers",
            default_doc="`0`: one per visible GPU (`CUDA_VISIBLE_DEVICES`, else the driver's "
            "devices), else one",
        ),
    )
    runtime: str = field(
        default="",
        metadata=doc(
            "tests and benchmarks only, never in production: a stand-in for Keras in the "
            "runners, `module:function` loading a classifier from (folder, settings, name, "
            "version)"
        ),
    )

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
        for f in fields(cls):
            raw = environ.get(f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, type(getattr(cls, f.name)))
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
