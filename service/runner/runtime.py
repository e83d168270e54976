"""The model runtime: the one module of the service that imports Keras, TensorFlow and JAX.

Runners run Keras on the backend KERAS_BACKEND names: `tensorflow` (one `tf.function` graph
per padded batch size) or `jax` (one `jax.jit`-compiled `stateless_call` per padded batch
size, compiled ahead of time). The same model.json and weights load into either; `check_model`
vets a model folder before it is built into a classifier (and alone, for `cnn-serve --check`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from model_folder import files as model_files
from model_folder.errors import ModelFolderError
from model_folder.files import ModelFiles, ModelInfo
from model_folder.preprocessing import InputSpec
from service.settings import SERVING_BACKENDS


@contextlib.contextmanager
def _native_stderr_discarded() -> Iterator[None]:
    """Discard what TensorFlow's C++ core prints at import: logs stay one JSON line each."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX maps 75% of a GPU's memory when it starts; this allocates as needed instead, as
# TensorFlow's memory growth does, so that several workers share a card.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
with _native_stderr_discarded():
    import keras

    BACKEND = keras.backend.backend()
    if BACKEND == "tensorflow":
        import tensorflow as tf
    elif BACKEND == "jax":
        import jax

from service.runner.gradcam import GradCam, is_softmax  # noqa: E402 - imports Keras first

log = logging.getLogger(__name__)

# The largest batch when MAX_BATCH_SIZE is 0: a GPU needs large batches to be kept busy.
DEFAULT_MAX_BATCH_SIZE = {"CPU": 32, "GPU": 128}


class KerasClassifier:
    """A loaded Keras classifier whose forward pass runs on fixed, padded batch sizes."""

    def __init__(self, model: keras.Model, info: ModelInfo, max_batch_size: int) -> None:
        self.info = info
        self.batch_sizes = padded_batch_sizes(max_batch_size)
        self._model = model
        compile_forwards = _jax_forwards if BACKEND == "jax" else _tensorflow_forwards
        self._forwards = compile_forwards(
            model, not ends_in_softmax(model), self.batch_sizes, info.input_shape, info.device
        )
        # The compiled size each batch of 1..max runs on: the smallest that holds it, until
        # warm_up has timed them all (a larger one may be faster: XLA's CPU programs are).
        self._size_for = [0, *map(self._smallest_holding, range(1, self.max_batch_size + 1))]
        self._gradcam: GradCam | None = None
        self._gradcam_lock = threading.Lock()

    @property
    def max_batch_size(self) -> int:
        """Return the largest batch one forward pass takes."""
        return self.batch_sizes[-1]

    def padded_size(self, count: int) -> int:
        """Return the compiled batch size a batch of `count` runs on."""
        return self._size_for[count]

    def _smallest_holding(self, count: int) -> int:
        return next(size for size in self.batch_sizes if size >= count)

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray:
        """Return class probabilities (N, classes) for float32 inputs (N, H, W, C)."""
        count = len(inputs)
        if count == 0 or count > self.max_batch_size:
            raise ValueError(f"batch of {count} is outside 1..{self.max_batch_size}")
        size = self.padded_size(count)
        if size != count:
            padding = np.zeros((size - count, *inputs.shape[1:]), dtype=np.float32)
            inputs = np.concatenate([inputs, padding])
        return self._forwards[size](np.ascontiguousarray(inputs, dtype=np.float32))[:count]

    def explain(self, inputs: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
        """Return the Grad-CAM of float32 inputs (N, H, W, C): the layer it looks at, each
        image's top class and its heatmap (uint8 N, H, W)."""
        with self._gradcam_lock:
            if self._gradcam is None:  # made on the first request: most never ask
                self._gradcam = GradCam(self._model, self.info.name)
        top, heatmaps = self._gradcam.explain(np.ascontiguousarray(inputs, dtype=np.float32))
        return self._gradcam.layer, top, heatmaps

    def warm_up(self) -> None:
        """Run the forward pass of every padded batch size; time each, and pad to the fastest.

        A batch of n runs on the compiled size >= n that took the least time, so a size
        slower than the next one up (XLA on a CPU has such sizes) is padded past.
        """
        took = {}
        for size in self.batch_sizes:
            inputs = np.zeros((size, *self.info.input_shape), dtype=np.float32)
            self._forwards[size](inputs)
            took[size] = min(_seconds(self._forwards[size], inputs) for _ in range(_TIMINGS))
        for count in range(1, self.max_batch_size + 1):
            natural = self._smallest_holding(count)
            fastest = min((s for s in self.batch_sizes if s >= count), key=took.__getitem__)
            # Only a clear gain pads further, so timing noise never costs a small batch.
            faster = took[fastest] < _CLEAR_GAIN * took[natural]
            self._size_for[count] = fastest if faster else natural


Forward = Callable[[np.ndarray], np.ndarray]

# Timed runs of each compiled size at warm-up (the fastest counts), and how much faster a
# larger size must be for a batch to be padded to it.
_TIMINGS = 3
_CLEAR_GAIN = 0.8


def _seconds(forward: Forward, inputs: np.ndarray) -> float:
    started = time.perf_counter()
    forward(inputs)
    return time.perf_counter() - started


def _tensorflow_forwards(
    model: keras.Model,
    softmax: bool,
    sizes: tuple[int, ...],
    shape: tuple[int, int, int],
    device: str,
) -> dict[int, Forward]:
    """Return one forward pass per batch size: a concrete graph, traced once here."""

    def call(inputs: tf.Tensor) -> tf.Tensor:
        outputs = model(inputs, training=False)
        return tf.nn.softmax(outputs) if softmax else outputs

    traced = tf.function(call)

    def forward_of(size: int) -> Forward:
        graph = traced.get_concrete_function(tf.TensorSpec((size, *shape), tf.float32))

        def forward(inputs: np.ndarray) -> np.ndarray:
            with tf.device(device):
                return graph(tf.constant(inputs)).numpy()

        return forward

    return {size: forward_of(size) for size in sizes}


def _jax_forwards(
    model: keras.Model,
    softmax: bool,
    sizes: tuple[int, ...],
    shape: tuple[int, int, int],
    device: str,
) -> dict[int, Forward]:
    """Return one forward pass per batch size: `stateless_call`, compiled ahead of time here.

    The weights are passed in as arguments rather than captured, so XLA does not fold them
    into each compiled program as constants.
    """
    trainable = [variable.value for variable in model.trainable_variables]
    non_trainable = [variable.value for variable in model.non_trainable_variables]

    def call(trainable: list, non_trainable: list, inputs: jax.Array) -> jax.Array:
        outputs, _ = model.stateless_call(trainable, non_trainable, inputs, training=False)
        return jax.nn.softmax(outputs) if softmax else outputs

    jitted = jax.jit(call)
    options: dict[str, str | bool] = {}
    if device.startswith("CPU"):
        options.update(CPU_COMPILER_OPTIONS)

    def forward_of(size: int) -> Forward:
        example = jax.ShapeDtypeStruct((size, *shape), np.float32)
        lowered = jitted.lower(trainable, non_trainable, example)
        try:
            compiled = lowered.compile(options)
        except jax.errors.JaxRuntimeError as exc:
            if not options or "compile option" not in str(exc):
                raise
            # A jaxlib without these options: its own defaults, then.
            log.info("XLA takes no %s; compiling with its defaults", sorted(options))
            options.clear()
            compiled = lowered.compile()
        return JaxForward(compiled, trainable, non_trainable)

    return {size: forward_of(size) for size in sizes}


class JaxForward:
    """One batch size's forward pass on JAX: its compiled XLA program and the weights."""

    def __init__(self, program: jax.stages.Compiled, trainable: list, non_trainable: list):
        self.program = program
        self._trainable = trainable
        self._non_trainable = non_trainable

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return np.asarray(self.program(self._trainable, self._non_trainable, inputs))


# XLA's CPU compiler hands some fusions to YNNPACK, an experimental library it enables by
# default (jaxlib 0.10). With the reference CNN on the 2-core development VM, XLA's own code
# was 1.4 to 1.7x faster at batch 16 and 32 (the CPU default's largest), 0.90 to 1.22x from
# 1 to 8, and 0.91 to 0.95x at 64 and 128 (bench/xla_options.py), so the service compiles without
# those fusions on a CPU; bench/compute_limit.py keeps the faster of both. Empty: XLA's
# defaults.
CPU_COMPILER_OPTIONS: dict[str, str | bool] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def padded_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Return the batch sizes forward passes are padded to: powers of two, then the max."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return tuple(sizes)


def ends_in_softmax(model: keras.Model) -> bool:
    """Tell whether the model's last layer already outputs a softmax."""
    return is_softmax(model.layers[-1])


@functools.cache
def configure_tensorflow(intra_op_threads: int = 0) -> str:
    """Set thread counts and GPU memory growth; return the device inference runs on.

    Once per process: TensorFlow takes these only before it first runs, and every later
    model version loads into the same configuration.
    """
    if intra_op_threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        except RuntimeError:
            log.warning("TensorFlow already initialised; intra-op thread count left as it was")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Without this one process maps the whole card and a second worker cannot start.
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    return "/GPU:0" if gpus else "/CPU:0"


@functools.cache
def configure_jax(intra_op_threads: int = 0) -> str:
    """Return the device JAX runs on: its first GPU if it has one, else the CPU.

    XLA sizes its CPU thread pool by the machine's cores; TF_INTRA_OP_THREADS does not apply.
    """
    platform = jax.devices()[0].platform
    return "/GPU:0" if platform in ("gpu", "cuda", "rocm") else "/CPU:0"


def check_model(
    folder: Path, name: str | None = None, version: str | None = None
) -> tuple[keras.Model, ModelFiles, InputSpec]:
    """Build, vet and load the model folder `folder`; run no code from it."""
    files = model_files.read(folder, name, version)
    json_path = files.folder / model_files.MODEL_JSON
    try:
        model = keras.models.model_from_json(_without_initial_values(files.architecture))
    except Exception as exc:
        raise ModelFolderError(f"{json_path}: not a Keras model ({_one_line(exc)})") from None
    if not isinstance(model, keras.Model):
        raise ModelFolderError(
            f"{json_path}: describes a {type(model).__name__}, not a Keras model"
        )
    shape = input_shape(model)
    if len(shape) != 3 or shape[2] not in (1, 3) or None in shape:
        raise ModelFolderError(f"{json_path}: input shape {shape} is not (height, width, 1 or 3)")
    output = tuple(model.output_shape) if not isinstance(model.output_shape, list) else ()
    if len(output) != 2:
        raise ModelFolderError(f"{json_path}: output shape {output} is not (batch, classes)")
    if output[1] != len(files.labels):
        raise ModelFolderError(
            f"{files.folder / model_files.LABELS}: {len(files.labels)} labels but the model "
            f"outputs {output[1]} classes"
        )
    try:
        model.load_weights(files.weights)
    except Exception as exc:
        raise ModelFolderError(f"{files.weights}: weights do not load ({_one_line(exc)})") from None
    return model, files, files.input_spec(*shape)


def _without_initial_values(architecture: str) -> str:
    """Return the architecture with every initializer set to zeros made on the host.

    The weights file sets every value right after, so random initial values are wasted work:
    on JAX each initializer compiles XLA programs, about 6 s of a worker's start-up for the
    reference CNN. Keras's own Zeros compiles one per shape too (0.56 s); numpy's zeros,
    copied to the device, compile nothing.
    """

    def zeroed(node: object) -> object:
        if isinstance(node, list):
            return [zeroed(item) for item in node]
        if not isinstance(node, dict):
            return node
        return {
            key: _ZEROS
            if key.endswith("_initializer") and isinstance(value, (dict, str))
            else zeroed(value)
            for key, value in node.items()
        }

    return json.dumps(zeroed(json.loads(architecture)))


@keras.saving.register_keras_serializable(package="cnn_serving")
class HostZeros(keras.initializers.Initializer):
    """Zeros made by numpy and copied to the device: no XLA program to compile."""

    def __call__(self, shape: tuple[int, ...], dtype: str | None = None) -> object:
        try:
            zeros = np.zeros(shape, keras.backend.standardize_dtype(dtype))
        except TypeError:  # a type numpy lacks, such as bfloat16
            return keras.ops.zeros(shape, dtype)
        # On JAX, jnp.asarray (which Keras would call) compiles a program per shape.
        return jax.device_put(zeros) if BACKEND == "jax" else zeros


_ZEROS: dict[str, object] = {
    "module": None,
    "class_name": HostZeros.__name__,
    "config": {},
    "registered_name": keras.saving.get_registered_name(HostZeros),
}


def input_shape(model: keras.Model) -> tuple[int, ...]:
    """Return the model's (height, width, channels), or () if it has not one 4-D input."""
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4:
        return ()
    return tuple(shape[1:])


def load_classifier(
    folder: Path,
    max_batch_size: int = 0,
    intra_op_threads: int = 0,
    *,
    name: str | None = None,
    version: str | None = None,
) -> KerasClassifier:
    """Load the model folder `folder` for serving; max_batch_size 0: the device's default."""
    if BACKEND not in SERVING_BACKENDS:
        raise ModelFolderError(
            f"the service runs Keras on tensorflow or jax, not KERAS_BACKEND={BACKEND}"
        )
    configure = configure_jax if BACKEND == "jax" else configure_tensorflow
    device = configure(intra_op_threads).strip("/")
    model, files, spec = check_model(folder, name, version)
    info = ModelInfo(files.name, files.version, files.labels, spec, device)
    return KerasClassifier(
        model, info, max_batch_size or DEFAULT_MAX_BATCH_SIZE[device.split(":")[0]]
    )


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
