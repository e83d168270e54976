"""Grad-CAM: where in an image the evidence for its top class lies, as the model sees it.

For the last convolution layer's activations A (h x w x k) and the top class's score before
the softmax (Grad-CAM's y^c: the softmax saturates when the model is sure, and its gradient
vanishes), each channel's weight is the mean of dy^c/dA over the map; the heatmap is
ReLU(sum_k weight_k * A_k), resized (bilinear) to the model's input and scaled to 0..255
by its maximum (Selvaraju et al., 2017). The gradients are the backend's own: TensorFlow's
GradientTape or jax.grad, on the same preprocessed input the prediction runs on.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from PIL import Image

from service.errors import InvalidRequest

BACKEND = keras.backend.backend()
METHOD = "gradcam"
CONVOLUTIONS = (
    keras.layers.Conv2D,
    keras.layers.SeparableConv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.Conv2DTranspose,
)


class GradCam:
    """The Grad-CAM of one model: its last convolution layer, and the map to the scores."""

    def __init__(self, model: keras.Model, name: str) -> None:
        """Split `model` (served as `name`) at its last convolution layer (none: `explain`
        refuses with 400)."""
        self.name = name
        convolutions = [layer for layer in model.layers if isinstance(layer, CONVOLUTIONS)]
        self.layer = convolutions[-1].name if convolutions else ""
        if not convolutions:
            return
        conv = convolutions[-1]
        last = model.layers[-1]
        # The class scores: the model's output, or what its softmax takes.
        before_softmax = is_softmax(last)
        dense_softmax = before_softmax and hasattr(last, "kernel")
        if isinstance(model, keras.Sequential):
            # Its layers again on new inputs (the weights are shared): a Sequential's own
            # graph may not be the one its layers' outputs were last traced in.
            layers = list(model.layers)
            index = layers.index(conv)
            inputs = keras.Input(shape=tuple(model.input_shape[1:]))
            x = inputs
            for layer in layers[: index + 1]:
                x = layer(x)
            self._head = keras.Model(inputs, x)
            activations = keras.Input(shape=tuple(x.shape[1:]))
            y = activations
            for layer in layers[index + 1 : -1 if before_softmax else None]:
                y = layer(y)
            tail = keras.Model(activations, y)
        else:
            self._head = keras.Model(model.inputs[0], conv.output)
            tail = keras.Model(conv.output, last.input if before_softmax else model.outputs[0])
        if dense_softmax:
            # A Dense(..., activation="softmax"): its scores are x W + b, before the softmax.
            def scores(activations):
                z = keras.ops.matmul(tail(activations), last.kernel)
                return z + last.bias if last.use_bias else z

            self._scores: Callable = scores
        else:
            self._scores = tail

    def explain(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return, for float32 inputs (N, H, W, C), each image's top class and its heatmap,
        uint8 (N, H, W), 255 where the evidence is strongest."""
        if not self.layer:
            raise InvalidRequest(
                f"model {self.name!r} has no convolution layer: Grad-CAM explains a CNN"
            )
        gradients = _tensorflow_gradients if BACKEND == "tensorflow" else _jax_gradients
        activations, grads, top = gradients(self._head, self._scores, inputs)
        weights = grads.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1, k)
        cams = np.maximum((weights * activations).sum(axis=-1), 0.0)  # (N, h, w)
        height, width = inputs.shape[1:3]
        return top, np.stack([_to_image(cam, width, height) for cam in cams])


def _tensorflow_gradients(head, scores, inputs: np.ndarray):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        activations = head(inputs, training=False)
        tape.watch(activations)
        z = scores(activations)
        top = tf.argmax(z, axis=-1)
        score = tf.reduce_sum(tf.gather(z, top, axis=1, batch_dims=1))
    grads = tape.gradient(score, activations)
    return activations.numpy(), grads.numpy(), top.numpy()


def _jax_gradients(head, scores, inputs: np.ndarray):
    import jax
    import jax.numpy as jnp

    activations = head(inputs, training=False)
    top = jnp.argmax(scores(activations), axis=-1)

    def score(a):
        return jnp.take_along_axis(scores(a), top[:, None], axis=1).sum()

    grads = jax.grad(score)(activations)
    return np.asarray(activations), np.asarray(grads), np.asarray(top)


def _to_image(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """Return the map resized (bilinear) to width x height, then 0..255 by its maximum."""
    resized = np.asarray(
        Image.fromarray(cam.astype(np.float32), mode="F").resize(
            (width, height), Image.Resampling.BILINEAR
        )
    )
    peak = float(resized.max())
    scaled = resized / peak if peak > 0 else np.zeros_like(resized)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def is_softmax(layer: keras.layers.Layer) -> bool:
    """Tell whether `layer` outputs a softmax (a Softmax layer, or its activation)."""
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) == "softmax"
