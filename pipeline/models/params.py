"""The models without Keras: every model's params class, and the registry of models (its params class,
loss and description), which is what params.yaml's `models:` blocks are checked against.

Stages that build no model (report) import this module, not registry.py, so they load no TensorFlow.
Adding a model: a params class here (or an existing one), one REGISTRY line here, a builder in its
family's module and one BUILDERS line in registry.py (for a new params class), and one block under
`models:` and one under `gates:` in params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import ModelParams, PositiveInt, Rate, Section
from pipeline.mnist import IMAGE_SHAPE


def conv_size(w1: int, f: int, s: int, pad_total: int) -> float:
    """W2 = (W1 - F + 2P)/S + 1 with 2P = pad_total; may be fractional (impossible geometry)."""
    return (w1 - f + pad_total) / s + 1


# Tutorials 1 and 2 (linear.py).
class LinearParams(ModelParams):
    """Tutorial 1 applied to MNIST: a least-squares linear classifier."""


class LogregParams(ModelParams):
    """Tutorial 2: softmax regression."""


# Tutorials 3 and 4 (mlp.py).
class MLPParams(ModelParams):
    """Tutorial 3: one hidden layer."""

    hidden_units: PositiveInt
    activation: Literal["sigmoid", "tanh", "relu"]


class DeepMLPParams(ModelParams):
    """Tutorial 4: hidden ReLU layers with dropout, given as drop rates."""

    hidden_units: list[PositiveInt] = Field(min_length=1)
    input_drop: Rate
    hidden_drop: Rate


# Tutorial 5 (cnn.py).
class CNNParams(ModelParams):
    """Tutorial 5's convolutional net."""

    filters: list[PositiveInt] = Field(min_length=1)
    kernel_size: PositiveInt
    dense_units: PositiveInt
    conv_drop: Rate
    dense_drop: Rate


# The conv-net notes' layer pattern (patterns.py).
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
    """INPUT -> [[CONV -> RELU]*N -> POOL?]*M -> [FC -> RELU]*K -> FC, its geometry checked with the notes' formulas."""

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


# The conv-net notes' LeNet-style flow (lenet.py).
class LeNetParams(ModelParams):
    """The notes' LeNet-style flow: C1 -> S2 -> sparse C3 -> S4 -> C5 -> F6 -> linear classifier."""

    activation: Literal["tanh", "abs_tanh"]
    c1_maps: PositiveInt
    c3_maps: PositiveInt
    c3_inputs: list[PositiveInt] = Field(min_length=2, max_length=2)  # fewest, most input maps per C3 map
    c5_units: PositiveInt
    f6_units: PositiveInt
    connection_seed: int = Field(ge=0)

    @model_validator(mode="after")
    def _strict_subsets(self) -> LeNetParams:
        fewest, most = self.c3_inputs
        if not fewest <= most < self.c1_maps:
            raise ValueError(
                f"c3_inputs = {self.c3_inputs}: each C3 map sees between `fewest` and `most` of the "
                f"{self.c1_maps} C1 maps, a strict subset, so 1 <= fewest <= most < c1_maps"
            )
        return self


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its params class, the loss it is trained with, one line about it."""

    params: type[ModelParams]
    loss: Literal["crossentropy", "mse"]
    description: str


REGISTRY: dict[str, ModelSpec] = {
    "linear": ModelSpec(LinearParams, "mse", "linear regression on one-hot targets (tutorial 1)"),
    "logreg": ModelSpec(LogregParams, "crossentropy", "softmax regression (tutorial 2)"),
    "mlp": ModelSpec(MLPParams, "crossentropy", "784-625(sigmoid)-10 (tutorial 3)"),
    "deep_mlp": ModelSpec(DeepMLPParams, "crossentropy", "784-625-625-10 ReLU + dropout (tutorial 4)"),
    "cnn": ModelSpec(CNNParams, "crossentropy", "3 conv blocks -> 625 -> 10 (tutorial 5)"),
    # The course's conv-net notes: its layer-pattern grammar (two presets) and its LeNet-style flow.
    "pattern_small": ModelSpec(PatternParams, "crossentropy", "INPUT -> [CONV -> RELU -> POOL]*2 -> FC -> RELU -> FC"),
    "pattern_deep": ModelSpec(
        PatternParams, "crossentropy", "INPUT -> [CONV -> RELU -> CONV -> RELU -> POOL]*3 -> [FC -> RELU]*2 -> FC"
    ),
    "lenet": ModelSpec(
        LeNetParams, "crossentropy", "LeNet-style: conv, tanh, trainable sub-sampling, sparse map, linear classifier"
    ),
}

# What config.load_params needs to type each models.<name> block.
PARAM_TYPES: dict[str, type[ModelParams]] = {name: spec.params for name, spec in REGISTRY.items()}
