"""The course notes' LeNet-style convolution flow, as two Keras layers and a builder.

The flow: convolution -> tanh (or |tanh|) -> sub-sampling (2x2 average, times a trainable
coefficient, plus a trainable bias, per feature map) -> a convolution whose maps each see a
seeded random strict subset of the previous maps (the notes' symmetry breaking) -> ... ->
a linear classifier y = Ax + b.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.models.layers import as_image, dense, initializer, l2, logits, pixels_in
from pipeline.models.params import LeNetParams


@keras.saving.register_keras_serializable(package="pipeline")
class SubSampling(keras.layers.Layer):  # type: ignore[misc]  # keras is untyped: its classes are Any
    """Average over FxF windows, times a trainable coefficient, plus a trainable bias, per feature map."""

    def __init__(self, pool_size: int = 2, strides: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_size = (pool_size, pool_size)
        self.strides = (strides or pool_size, strides or pool_size)
        self.padding = "valid"

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        maps = input_shape[-1]
        self.coefficient = self.add_weight(shape=(maps,), initializer="ones", name="coefficient")
        self.bias = self.add_weight(shape=(maps,), initializer="zeros", name="bias")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        avg = tf.nn.avg_pool2d(x, self.pool_size, self.strides, "VALID")
        return avg * self.coefficient + self.bias

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        b, h, w, d = input_shape
        f, s = self.pool_size[0], self.strides[0]
        return (b, None if h is None else (h - f) // s + 1, None if w is None else (w - f) // s + 1, d)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pool_size": self.pool_size[0], "strides": self.strides[0]}


def connection_map(inputs: int, outputs: int, fewest: int, most: int, seed: int) -> np.ndarray:
    """A bool [inputs, outputs] map: output map j sees a random strict subset of the input maps.

    Each output map draws its subset size in [fewest, most] (most < inputs) and the maps
    themselves from a generator seeded by `seed`, so the map is reproducible.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros((inputs, outputs), dtype=bool)
    for j in range(outputs):
        mask[rng.choice(inputs, size=int(rng.integers(fewest, most + 1)), replace=False), j] = True
    return mask


@keras.saving.register_keras_serializable(package="pipeline")
class SparseConv2D(keras.layers.Layer):  # type: ignore[misc]  # keras is untyped: its classes are Any
    """A 'valid' convolution in which output map j only sees the input maps that `connections[:, j]` marks.

    Only the connected weights exist (F*F per connected pair), so the parameter count is
    the notes': F*F*(connected pairs) + K biases.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        connections: np.typing.ArrayLike,
        activation: str | Callable[..., Any] | None = None,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        kernel_regularizer: keras.regularizers.Regularizer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = (kernel_size, kernel_size)
        self.strides = (1, 1)
        self.padding = "valid"
        self.connections = np.asarray(connections, dtype=bool)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        f = self.kernel_size[0]
        pairs = np.argwhere(self.connections)  # (input map, output map) per connected pair
        self._pairs = tf.constant(pairs, dtype=tf.int32)

        def initial(shape: tuple[int, ...], dtype: Any = None) -> tf.Tensor:
            # Draw a dense [F, F, in, out] kernel (so the initializer sees conv fans), keep the connected pairs.
            full = self.kernel_initializer(shape=(f, f, *self.connections.shape), dtype=dtype)
            return tf.gather_nd(tf.transpose(full, [2, 3, 0, 1]), self._pairs)

        self.kernel = self.add_weight(
            shape=(len(pairs), f, f), initializer=initial, regularizer=self.kernel_regularizer, name="kernel"
        )
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        f = self.kernel_size[0]
        shape = tf.constant([self.connections.shape[0], self.filters, f, f])
        full = tf.scatter_nd(self._pairs, self.kernel, shape)  # [in, out, F, F], zero where unconnected
        kernel = tf.transpose(full, [2, 3, 0, 1])  # [F, F, in, out]
        return self.activation(tf.nn.conv2d(x, kernel, 1, "VALID") + self.bias)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        b, h, w, _ = input_shape
        f = self.kernel_size[0]
        return (b, None if h is None else h - f + 1, None if w is None else w - f + 1, self.filters)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size[0],
            "connections": self.connections.astype(int).tolist(),
            "activation": keras.activations.serialize(self.activation),
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer) if self.kernel_regularizer else None,
        }


@keras.saving.register_keras_serializable(package="pipeline")  # type: ignore[untyped-decorator]  # keras is untyped
def abs_tanh(x: tf.Tensor) -> tf.Tensor:
    """The notes' "apply Tan & Abs": |tanh(x)|."""
    return tf.abs(tf.tanh(x))


def build_lenet(p: LeNetParams) -> keras.Model:
    act = abs_tanh if p.activation == "abs_tanh" else "tanh"
    mask = connection_map(p.c1_maps, p.c3_maps, p.c3_inputs[0], p.c3_inputs[1], p.connection_seed)
    return keras.Sequential(
        [
            *pixels_in(),
            as_image(),
            keras.layers.Conv2D(
                p.c1_maps,
                5,
                padding="same",
                activation=act,
                kernel_initializer=initializer(p),
                kernel_regularizer=l2(p),
                name="c1",
            ),
            SubSampling(2, name="s2"),
            keras.layers.Activation(act, name="s2_act"),
            SparseConv2D(
                p.c3_maps, 5, mask, activation=act, kernel_initializer=initializer(p), kernel_regularizer=l2(p), name="c3"
            ),
            SubSampling(2, name="s4"),
            keras.layers.Activation(act, name="s4_act"),
            keras.layers.Flatten(name="flatten"),
            dense(p.c5_units, p, act, "c5"),
            dense(p.f6_units, p, act, "f6"),
            logits(p),  # the linear classifier y = Ax + b
        ],
        name="lenet",
    )
