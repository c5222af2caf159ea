"""The model registry with Keras: every model's builder and loss, over the registry of params.py.

REGISTRY and PARAM_TYPES are params.py's (one table of models); this module adds the builders.
Importing it also registers the custom layers and loss that saved models refer to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from pipeline.config import ModelParams
from pipeline.models.cnn import build_cnn
from pipeline.models.lenet import build_lenet
from pipeline.models.linear import build_linear, build_logreg, onehot_mse
from pipeline.models.mlp import build_deep_mlp, build_mlp
from pipeline.models.params import (
    PARAM_TYPES,
    REGISTRY,
    CNNParams,
    DeepMLPParams,
    LeNetParams,
    LinearParams,
    LogregParams,
    MLPParams,
    ModelSpec,
    PatternParams,
)
from pipeline.models.patterns import build_pattern

__all__ = ["BUILDERS", "PARAM_TYPES", "REGISTRY", "ModelSpec", "build", "loss"]

# Each params class's builder: a registry model is built by its params class's.
BUILDERS: dict[type[ModelParams], Callable[..., keras.Model]] = {
    LinearParams: build_linear,
    LogregParams: build_logreg,
    MLPParams: build_mlp,
    DeepMLPParams: build_deep_mlp,
    CNNParams: build_cnn,
    PatternParams: build_pattern,
    LeNetParams: build_lenet,
}


def build(name: str, p: ModelParams) -> keras.Model:
    """Build registry model `name` from its typed params."""
    return BUILDERS[REGISTRY[name].params](p)


def loss(name: str) -> keras.losses.Loss | Callable[..., Any]:
    """The Keras loss model `name` is trained with."""
    if REGISTRY[name].loss == "mse":
        return onehot_mse
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
