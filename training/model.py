"""The classic Keras CNN of the design: Conv-ReLU blocks with pooling and dropout, then Dense."""

from __future__ import annotations

from collections.abc import Sequence

import keras


def make_model(
    input_shape: tuple[int, int, int],
    num_classes: int,
    filters: Sequence[int] = (32, 64),
    convs_per_block: int = 2,
    dense_units: int = 128,
    dropout: float = 0.25,
) -> keras.Sequential:
    """Build the CNN: one block of `convs_per_block` 3x3 convolutions per entry of `filters`."""
    height, width, _ = input_shape
    needed = smallest_input_side(len(filters), convs_per_block)
    if min(height, width) < needed:
        raise ValueError(
            f"input {height}x{width} is too small for {len(filters)} blocks of "
            f"{convs_per_block} convolution(s): it needs at least {needed}x{needed}"
        )
    layers: list[keras.layers.Layer] = [keras.Input(input_shape)]
    for block_filters in filters:
        for _ in range(convs_per_block):
            layers += [keras.layers.Conv2D(block_filters, (3, 3)), keras.layers.Activation("relu")]
        # Halve the feature map, and drop activations so the blocks do not memorise the data.
        layers += [keras.layers.MaxPooling2D(), keras.layers.Dropout(dropout)]
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(dense_units),
        keras.layers.Activation("relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(num_classes),
        keras.layers.Activation("softmax"),
    ]
    return keras.Sequential(layers, name="cnn")


def smallest_input_side(blocks: int, convs_per_block: int) -> int:
    """Return the smallest image side the blocks take: each 3x3 conv trims 2, each pool halves."""
    side = 1
    for _ in range(blocks):
        side = side * 2 + 2 * convs_per_block
    return side
