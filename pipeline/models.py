"""The model registry: each model is a params class, a builder and one REGISTRY entry.

Every model takes raw pixels as float32 [batch, 28, 28] in 0..255, rescales them itself
(so the exported SavedModel needs no outside preprocessing) and returns 10 logits.
Adding a model: a params class, a builder, a REGISTRY line, a params.yaml block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import keras
from keras import layers
from pydantic import Field

from pipeline.config import ModelParams, PositiveInt, Rate
from pipeline.lenet import LeNetParams, build_lenet
from pipeline.patterns import PatternParams, build_pattern

NUM_CLASSES = 10


# --- the seed's models -------------------------------------------------------------


class LinearParams(ModelParams):
    """Tutorial 1 applied to MNIST: a least-squares linear classifier, 784 -> 10."""


class LogregParams(ModelParams):
    """Tutorial 2: softmax regression, 784 -> 10."""


class MLPParams(ModelParams):
    """Tutorial 3: one hidden layer."""

    hidden_units: PositiveInt
    activation: Literal["sigmoid", "tanh", "relu"]


class DeepMLPParams(ModelParams):
    """Tutorial 4: two hidden ReLU layers with (inverted) dropout, given as drop rates."""

    hidden_units: list[PositiveInt] = Field(min_length=1)
    input_drop: Rate
    hidden_drop: Rate


class CNNParams(ModelParams):
    """Tutorial 5: [conv3x3 -> ReLU -> maxpool2 -> dropout] x 3 -> dense -> dropout -> 10."""

    filters: list[PositiveInt] = Field(min_length=1)
    kernel_size: PositiveInt
    dense_units: PositiveInt
    conv_drop: Rate
    dense_drop: Rate


def initializer(p: ModelParams) -> keras.initializers.Initializer:
    """The seed's N(0, 0.01), Glorot, or He's sqrt(2/n) initialisation."""
    return {
        "normal": lambda: keras.initializers.RandomNormal(stddev=0.01),
        "glorot": keras.initializers.GlorotUniform,
        "he": keras.initializers.HeNormal,
    }[p.init]()


def dense(units: int, p: ModelParams, activation: str | None = None, name: str | None = None) -> layers.Dense:
    """A dense layer with the model's initialisation and L2 weight decay."""
    return layers.Dense(
        units,
        activation=activation,
        kernel_initializer=initializer(p),
        kernel_regularizer=keras.regularizers.L2(p.l2) if p.l2 else None,
        name=name,
    )


def pixels_in() -> list[layers.Layer]:
    """Input of raw pixels, rescaled to 0..1 inside the model."""
    return [keras.Input(shape=(28, 28), name="pixels"), layers.Rescaling(1.0 / 255, name="rescale")]


def build_linear(p: LinearParams) -> keras.Model:
    return keras.Sequential([*pixels_in(), layers.Flatten(name="flatten"), dense(NUM_CLASSES, p, name="logits")], name="linear")


def build_logreg(p: LogregParams) -> keras.Model:
    return keras.Sequential([*pixels_in(), layers.Flatten(name="flatten"), dense(NUM_CLASSES, p, name="logits")], name="logreg")


def build_mlp(p: MLPParams) -> keras.Model:
    return keras.Sequential(
        [*pixels_in(), layers.Flatten(name="flatten"), dense(p.hidden_units, p, p.activation, "hidden"), dense(NUM_CLASSES, p, name="logits")],
        name="mlp",
    )


def build_deep_mlp(p: DeepMLPParams) -> keras.Model:
    stack = [*pixels_in(), layers.Flatten(name="flatten"), layers.Dropout(p.input_drop, name="input_dropout")]
    for i, units in enumerate(p.hidden_units, 1):
        stack += [dense(units, p, "relu", f"hidden{i}"), layers.Dropout(p.hidden_drop, name=f"dropout{i}")]
    return keras.Sequential([*stack, dense(NUM_CLASSES, p, name="logits")], name="deep_mlp")


def build_cnn(p: CNNParams) -> keras.Model:
    stack = [*pixels_in(), layers.Reshape((28, 28, 1), name="to_image")]
    for i, filters in enumerate(p.filters, 1):
        stack += [
            layers.Conv2D(
                filters,
                p.kernel_size,
                padding="same",
                activation="relu",
                kernel_initializer=initializer(p),
                kernel_regularizer=keras.regularizers.L2(p.l2) if p.l2 else None,
                name=f"conv{i}",
            ),
            layers.MaxPooling2D(2, padding="same", name=f"pool{i}"),
            layers.Dropout(p.conv_drop, name=f"conv_dropout{i}"),
        ]
    stack += [
        layers.Flatten(name="flatten"),
        dense(p.dense_units, p, "relu", "dense"),
        layers.Dropout(p.dense_drop, name="dense_dropout"),
        dense(NUM_CLASSES, p, name="logits"),
    ]
    return keras.Sequential(stack, name="cnn")


# --- the registry --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its params class, its builder, and the loss it is trained with."""

    params: type[ModelParams]
    build: Callable[..., keras.Model]
    loss: Literal["crossentropy", "mse"] = "crossentropy"
    description: str = ""


REGISTRY: dict[str, ModelSpec] = {
    "linear": ModelSpec(LinearParams, build_linear, "mse", "linear regression on one-hot targets (tutorial 1)"),
    "logreg": ModelSpec(LogregParams, build_logreg, "crossentropy", "softmax regression (tutorial 2)"),
    "mlp": ModelSpec(MLPParams, build_mlp, "crossentropy", "784-625(sigmoid)-10 (tutorial 3)"),
    "deep_mlp": ModelSpec(DeepMLPParams, build_deep_mlp, "crossentropy", "784-625-625-10 ReLU + dropout (tutorial 4)"),
    "cnn": ModelSpec(CNNParams, build_cnn, "crossentropy", "3 conv blocks -> 625 -> 10 (tutorial 5)"),
    # The seed's conv-net notes: its layer-pattern grammar (two presets) and its LeNet-style flow.
    "pattern_small": ModelSpec(PatternParams, build_pattern, "crossentropy", "INPUT -> [CONV -> RELU -> POOL]*2 -> FC -> RELU -> FC"),
    "pattern_deep": ModelSpec(
        PatternParams, build_pattern, "crossentropy", "INPUT -> [CONV -> RELU -> CONV -> RELU -> POOL]*3 -> [FC -> RELU]*2 -> FC"
    ),
    "lenet": ModelSpec(LeNetParams, build_lenet, "crossentropy", "LeNet-style: conv, tanh, trainable sub-sampling, sparse map, linear classifier"),
}


def build(name: str, p: ModelParams) -> keras.Model:
    """Build registry model `name` from its validated params."""
    return REGISTRY[name].build(p)
