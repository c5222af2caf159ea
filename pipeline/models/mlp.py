"""The course's tutorials 3 and 4: a feed-forward net, and a deeper one with (inverted) dropout."""

from __future__ import annotations

import keras
from keras import layers

from pipeline.models.layers import dense, logits, pixels_in
from pipeline.models.params import DeepMLPParams, MLPParams


def build_mlp(p: MLPParams) -> keras.Model:
    return keras.Sequential(
        [*pixels_in(), layers.Flatten(name="flatten"), dense(p.hidden_units, p, p.activation, "hidden"), logits(p)],
        name="mlp",
    )


def build_deep_mlp(p: DeepMLPParams) -> keras.Model:
    stack = [*pixels_in(), layers.Flatten(name="flatten"), layers.Dropout(p.input_drop, name="input_dropout")]
    for i, units in enumerate(p.hidden_units, 1):
        stack += [dense(units, p, "relu", f"hidden{i}"), layers.Dropout(p.hidden_drop, name=f"dropout{i}")]
    return keras.Sequential([*stack, logits(p)], name="deep_mlp")
