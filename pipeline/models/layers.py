"""Layer helpers every model family shares: the raw-pixel input, initialisation, L2, dense and conv layers.

Every model takes raw pixels as float32 [batch, height, width] in 0..255, rescales them
itself (so the exported SavedModel needs no outside preprocessing) and returns one logit
per class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import layers

from pipeline.config import ModelParams
from pipeline.mnist import IMAGE_SHAPE, NUM_CLASSES


def initializer(p: ModelParams) -> keras.initializers.Initializer:
    """The course's N(0, 0.01), Glorot, or He's sqrt(2/n) initialisation."""
    return {
        "normal": lambda: keras.initializers.RandomNormal(stddev=0.01),
        "glorot": keras.initializers.GlorotUniform,
        "he": keras.initializers.HeNormal,
    }[p.init]()


def l2(p: ModelParams) -> keras.regularizers.Regularizer | None:
    """The model's L2 weight decay, or none."""
    return keras.regularizers.L2(p.l2) if p.l2 else None


def dense(
    units: int, p: ModelParams, activation: str | Callable[..., Any] | None = None, name: str | None = None
) -> layers.Dense:
    """A dense layer with the model's initialisation and L2 weight decay."""
    return layers.Dense(units, activation=activation, kernel_initializer=initializer(p), kernel_regularizer=l2(p), name=name)


def logits(p: ModelParams) -> layers.Dense:
    """The output layer: one logit per class, no activation."""
    return dense(NUM_CLASSES, p, name="logits")


def pixels_in() -> list[layers.Layer]:
    """Input of raw pixels, rescaled to 0..1 inside the model."""
    return [keras.Input(shape=IMAGE_SHAPE, name="pixels"), layers.Rescaling(1.0 / 255, name="rescale")]


def as_image() -> layers.Reshape:
    """Pixels [height, width] as a one-channel image [height, width, 1] for the convolutions."""
    return layers.Reshape((*IMAGE_SHAPE, 1), name="to_image")
