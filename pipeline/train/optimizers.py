"""The optimizer a model's params name, with its learning-rate schedule."""

from __future__ import annotations

from typing import Any

import keras

from pipeline.config import ModelParams


def learning_rate(p: ModelParams, steps_per_epoch: int) -> Any:
    """The learning rate: a constant, or a schedule stepped per batch."""
    if p.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(p.learning_rate, steps_per_epoch, p.lr_decay)
    if p.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(p.learning_rate, steps_per_epoch * p.epochs)
    return p.learning_rate


def make_optimizer(p: ModelParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer named in params, with its own knob (momentum, rho) and learning-rate schedule."""
    lr = learning_rate(p, steps_per_epoch)
    if p.optimizer == "sgd":
        return keras.optimizers.SGD(lr)
    if p.optimizer == "momentum":
        return keras.optimizers.SGD(lr, momentum=p.momentum)
    if p.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr, rho=p.rho)
    return keras.optimizers.Adam(lr)
