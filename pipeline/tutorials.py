"""The course's first two tutorials, on the project's own training code.

Tutorial 0 multiplies two numbers in a TensorFlow graph; tutorial 1 fits `y = w x` to
noisy points with the same optimizer factory and Keras `fit` the pipeline's models use.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from pipeline.config import ModelParams
from pipeline.train.loop import seed_everything
from pipeline.train.optimizers import make_optimizer


@tf.function  # type: ignore[untyped-decorator]  # tensorflow is untyped
def multiply(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Tutorial 0: y = a * b, as a traced graph."""
    return a * b


def noisy_line(seed: int = 1337, points: int = 101, slope: float = 2.0, noise: float = 0.33) -> tuple[np.ndarray, np.ndarray]:
    """Tutorial 1's data: y = slope * x + N(0, noise) on `points` evenly spaced x in [-1, 1]."""
    x = np.linspace(-1, 1, points, dtype=np.float32)
    y = slope * x + np.random.default_rng(seed).normal(0, noise, points).astype(np.float32)
    return x, y


def fit_line(x: np.ndarray, y: np.ndarray, p: ModelParams, seed: int) -> float:
    """Tutorial 1: fit y = w x (no bias) by least squares with the pipeline's optimizer; return w."""
    seed_everything(seed, deterministic=True)
    model = keras.Sequential([keras.Input(shape=(1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=make_optimizer(p, steps_per_epoch=len(x)), loss="mse")
    model.fit(x[:, None], y[:, None], batch_size=p.batch_size, epochs=p.epochs, shuffle=False, verbose=0)
    return float(model.layers[0].kernel.numpy()[0, 0])
