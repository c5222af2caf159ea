"""The course's tutorial 5: [conv3x3 -> ReLU -> maxpool2 -> dropout] x 3 -> dense -> dropout -> 10."""

from __future__ import annotations

import keras
from keras import layers

from pipeline.models.layers import as_image, dense, initializer, l2, logits, pixels_in
from pipeline.models.params import CNNParams


def build_cnn(p: CNNParams) -> keras.Model:
    stack = [*pixels_in(), as_image()]
    for i, filters in enumerate(p.filters, 1):
        stack += [
            layers.Conv2D(
                filters,
                p.kernel_size,
                padding="same",
                activation="relu",
                kernel_initializer=initializer(p),
                kernel_regularizer=l2(p),
                name=f"conv{i}",
            ),
            layers.MaxPooling2D(2, padding="same", name=f"pool{i}"),
            layers.Dropout(p.conv_drop, name=f"conv_dropout{i}"),
        ]
    stack += [
        layers.Flatten(name="flatten"),
        dense(p.dense_units, p, "relu", "dense"),
        layers.Dropout(p.dense_drop, name="dense_dropout"),
        logits(p),
    ]
    return keras.Sequential(stack, name="cnn")
