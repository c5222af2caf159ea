"""The course's layer-pattern grammar, from its conv-net notes, as a model defined in params.yaml:

    INPUT -> [[CONV -> RELU]*N -> POOL?]*M -> [FC -> RELU]*K -> FC

N convolutions per block, M blocks (one entry each under `blocks`, with its filter count,
its convolutions' F, S, P and its pool's F, S, or no pool), K hidden FC layers (`fc_units`).
The notes bound N <= 3 and K < 3. The geometry is checked with the notes' formulas before
any training (PatternParams, in params.py): every W2 must be a positive whole number, else the
config names the layer.
"""

from __future__ import annotations

import keras

from pipeline.models.layers import as_image, dense, initializer, l2, logits, pixels_in
from pipeline.models.params import PatternParams


def build_pattern(p: PatternParams, name: str = "pattern") -> keras.Model:
    stack = [*pixels_in(), as_image()]
    for m, block in enumerate(p.blocks, 1):
        for i in range(1, p.n + 1):
            if block.p:
                stack.append(keras.layers.ZeroPadding2D(block.p, name=f"b{m}_pad{i}"))
            stack.append(
                keras.layers.Conv2D(
                    block.filters,
                    block.f,
                    strides=block.s,
                    padding="valid",
                    activation="relu",
                    kernel_initializer=initializer(p),
                    kernel_regularizer=l2(p),
                    name=f"b{m}_conv{i}",
                )
            )
        if block.pool_f is not None:
            stack.append(keras.layers.MaxPooling2D(block.pool_f, block.pool_s, name=f"b{m}_pool"))
    stack.append(keras.layers.Flatten(name="flatten"))
    for k, units in enumerate(p.fc_units, 1):
        stack += [keras.layers.Dropout(p.dropout, name=f"fc{k}_dropout"), dense(units, p, "relu", f"fc{k}")]
    stack += [keras.layers.Dropout(p.dropout, name="out_dropout"), logits(p)]
    return keras.Sequential(stack, name=name)
