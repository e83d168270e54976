"""The model runtime: the one module of the service that imports Keras and TensorFlow.

Workers run Keras on its TensorFlow backend. The launcher imports this module on Keras's numpy
backend instead (`cnn-serve` sets KERAS_BACKEND first): `check_model` builds and vets the model
there without TensorFlow, so a bad model stops start-up within seconds, and TensorFlow is
imported once per worker rather than once more in the launcher.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model_folder import files as model_files
from model_folder.errors import ModelFolderError
from model_folder.files import ModelFiles, ModelInfo
from model_folder.preprocessing import InputSpec


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
with _native_stderr_discarded():
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

log = logging.getLogger(__name__)

# The largest batch when MAX_BATCH_SIZE is 0: a GPU needs large batches to be kept busy.
DEFAULT_MAX_BATCH_SIZE = {"CPU": 32, "GPU": 128}


class Classifier:
    """A loaded Keras classifier whose forward pass runs on fixed, padded batch sizes."""

    def __init__(self, model: keras.Model, info: ModelInfo, max_batch_size: int) -> None:
        self.info = info
        self.batch_sizes = padded_batch_sizes(max_batch_size)
        self._model = model
        self._apply_softmax = not ends_in_softmax(model)
        # One concrete graph per padded batch size, traced once here and reused for every batch.
        forward = tf.function(self._call)
        self._graphs = {
            size: forward.get_concrete_function(
                tf.TensorSpec((size, *info.input_shape), tf.float32)
            )
            for size in self.batch_sizes
        }

    @property
    def max_batch_size(self) -> int:
        """Return the largest batch one forward pass takes."""
        return self.batch_sizes[-1]

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray:
        """Return class probabilities (N, classes) for float32 inputs (N, H, W, C)."""
        count = len(inputs)
        if count == 0 or count > self.max_batch_size:
            raise ValueError(f"batch of {count} is outside 1..{self.max_batch_size}")
        size = next(s for s in self.batch_sizes if s >= count)
        if size != count:
            padding = np.zeros((size - count, *inputs.shape[1:]), dtype=np.float32)
            inputs = np.concatenate([inputs, padding])
        with tf.device(self.info.device):
            outputs = self._graphs[size](tf.constant(inputs, dtype=tf.float32))
        return outputs.numpy()[:count]

    def warm_up(self) -> None:
        """Trace and run the graph of every padded batch size once."""
        for size in self.batch_sizes:
            self.predict_batch(np.zeros((size, *self.info.input_shape), dtype=np.float32))

    def _call(self, inputs: tf.Tensor) -> tf.Tensor:
        outputs = self._model(inputs, training=False)
        return tf.nn.softmax(outputs) if self._apply_softmax else outputs


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
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", None) == "softmax"


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


def check_model(
    folder: Path, name: str | None = None, version: str | None = None
) -> tuple[keras.Model, ModelFiles, InputSpec]:
    """Build, vet and load the model folder `folder`; run no code from it."""
    files = model_files.read(folder, name, version)
    json_path = files.folder / model_files.MODEL_JSON
    try:
        model = keras.models.model_from_json(files.architecture)
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
) -> Classifier:
    """Load the model folder `folder` for serving; max_batch_size 0: the device's default."""
    if keras.backend.backend() != "tensorflow":
        raise ModelFolderError(
            f"the service runs Keras on TensorFlow, not KERAS_BACKEND={keras.backend.backend()}"
        )
    device = configure_tensorflow(intra_op_threads).strip("/")
    model, files, spec = check_model(folder, name, version)
    info = ModelInfo(files.name, files.version, files.labels, spec, device)
    return Classifier(model, info, max_batch_size or DEFAULT_MAX_BATCH_SIZE[device.split(":")[0]])


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
