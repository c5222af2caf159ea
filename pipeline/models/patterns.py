"""The course's layer-pattern grammar, from its conv-net notes, as a model defined in params.yaml:

    INPUT -> [[CONV -> RELU]*N -> POOL?]*M -> [FC -> RELU]*K -> FC

N convolutions per block, M blocks (one entry each under `blocks`, with its filter count,
its convolutions' F, S, P and its pool's F, S, or no pool), K hidden FC layers (`fc_units`).
The notes bound N <= 3 and K < 3. The geometry is checked with the notes' formulas before
any training: every W2 must be a positive whole number, else the config names the layer.
"""

from __future__ import annotations

import keras
from pydantic import Field, model_validator

from pipeline.config import ModelParams, PositiveInt, Rate, Section
from pipeline.mnist import IMAGE_SHAPE
from pipeline.models.arithmetic import conv_size
from pipeline.models.layers import as_image, dense, initializer, l2, logits, pixels_in

MAX_N = 3  # the notes: N <= 3
MAX_K = 2  # the notes: K < 3


class Block(Section):
    """One [CONV -> RELU]*N -> POOL? block."""

    filters: PositiveInt  # K of each conv in the block
    f: PositiveInt  # conv filter size F
    s: PositiveInt  # conv stride S
    p: int = Field(ge=0)  # conv zero padding P
    pool_f: PositiveInt | None  # pool size F; null = no POOL
    pool_s: PositiveInt | None  # pool stride S


class PatternParams(ModelParams):
    n: int = Field(ge=1)  # [CONV -> RELU]*N per block
    blocks: list[Block] = Field(min_length=1)  # M = len(blocks)
    fc_units: list[PositiveInt]  # K = len(fc_units)
    dropout: Rate  # before each FC layer

    @model_validator(mode="after")
    def _within_the_notes_bounds(self) -> PatternParams:
        if self.n > MAX_N:
            raise ValueError(f"n = {self.n}: the notes' pattern allows at most N = {MAX_N} CONV -> RELU per block")
        if len(self.fc_units) > MAX_K:
            raise ValueError(f"fc_units has K = {len(self.fc_units)} layers: the notes' pattern allows K < 3 ([FC -> RELU]*K)")
        size = IMAGE_SHAPE[0]  # square images: the width follows the same arithmetic
        for m, block in enumerate(self.blocks, 1):
            if (block.pool_f is None) != (block.pool_s is None):
                raise ValueError(f"block {m}: give pool_f and pool_s together, or neither for no POOL")
            for i in range(1, self.n + 1):
                size = _check(size, block.f, block.s, 2 * block.p, f"block {m} conv {i} (F={block.f}, S={block.s}, P={block.p})")
            if block.pool_f is not None:
                size = _check(size, block.pool_f, block.pool_s, 0, f"block {m} pool (F={block.pool_f}, S={block.pool_s})")  # type: ignore[arg-type]  # pool_s is set with pool_f (checked above)
        return self


def _check(w1: int, f: int, s: int, pad_total: int, where: str) -> int:
    w2 = conv_size(w1, f, s, pad_total)
    if w2 != int(w2) or w2 <= 0:
        raise ValueError(
            f"{where}: W2 = (W1 - F + 2P)/S + 1 = ({w1} - {f} + {pad_total})/{s} + 1 = {w2:g}, "
            "not a positive whole number; change F, S or P"
        )
    return int(w2)


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
