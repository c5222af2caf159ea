"""The model registry: every model's params class, builder, loss and description, in one table.

Adding a model: a params class and a builder (in its family's module, or a new one), one
REGISTRY line here, and one block under `models:` and one under `gates:` in params.yaml.
Importing this module also registers the custom layers and loss that saved models refer to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import keras

from pipeline.config import ModelParams
from pipeline.models.cnn import CNNParams, build_cnn
from pipeline.models.lenet import LeNetParams, build_lenet
from pipeline.models.linear import LinearParams, LogregParams, build_linear, build_logreg, onehot_mse
from pipeline.models.mlp import DeepMLPParams, MLPParams, build_deep_mlp, build_mlp
from pipeline.models.patterns import PatternParams, build_pattern


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its params class, its builder, the loss it is trained with, one line about it."""

    params: type[ModelParams]
    build: Callable[..., keras.Model]
    loss: Literal["crossentropy", "mse"]
    description: str


REGISTRY: dict[str, ModelSpec] = {
    "linear": ModelSpec(LinearParams, build_linear, "mse", "linear regression on one-hot targets (tutorial 1)"),
    "logreg": ModelSpec(LogregParams, build_logreg, "crossentropy", "softmax regression (tutorial 2)"),
    "mlp": ModelSpec(MLPParams, build_mlp, "crossentropy", "784-625(sigmoid)-10 (tutorial 3)"),
    "deep_mlp": ModelSpec(DeepMLPParams, build_deep_mlp, "crossentropy", "784-625-625-10 ReLU + dropout (tutorial 4)"),
    "cnn": ModelSpec(CNNParams, build_cnn, "crossentropy", "3 conv blocks -> 625 -> 10 (tutorial 5)"),
    # The course's conv-net notes: its layer-pattern grammar (two presets) and its LeNet-style flow.
    "pattern_small": ModelSpec(
        PatternParams, build_pattern, "crossentropy", "INPUT -> [CONV -> RELU -> POOL]*2 -> FC -> RELU -> FC"
    ),
    "pattern_deep": ModelSpec(
        PatternParams, build_pattern, "crossentropy", "INPUT -> [CONV -> RELU -> CONV -> RELU -> POOL]*3 -> [FC -> RELU]*2 -> FC"
    ),
    "lenet": ModelSpec(
        LeNetParams, build_lenet, "crossentropy", "LeNet-style: conv, tanh, trainable sub-sampling, sparse map, linear classifier"
    ),
}

# What config.load_params needs to type each models.<name> block.
PARAM_TYPES: dict[str, type[ModelParams]] = {name: spec.params for name, spec in REGISTRY.items()}


def build(name: str, p: ModelParams) -> keras.Model:
    """Build registry model `name` from its typed params."""
    return REGISTRY[name].build(p)


def loss(name: str) -> keras.losses.Loss | Callable[..., Any]:
    """The Keras loss model `name` is trained with."""
    if REGISTRY[name].loss == "mse":
        return onehot_mse
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
