"""The course notes' conv-net arithmetic: each layer's output volume and parameter count, from the formulas.

    conv:    W2 = (W1 - F + 2P)/S + 1,  H2 likewise,  D2 = K;  (F*F*D1)*K weights + K biases
    pool:    W2 = (W1 - F)/S + 1,       D2 = D1;      no parameters
    dense:   N2 = K;                    N1*K weights + K biases

Keras's "same" padding may pad one pixel more on one side than the other; the table then
shows the total padding 2P as P_total, and the formula reads W2 = (W1 - F + P_total)/S + 1.
The table is computed without Keras's shape inference and checked against it in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from pipeline import tables
from pipeline.models.lenet import SparseConv2D, SubSampling
from pipeline.models.params import conv_size


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    shape: tuple[int, ...]  # output volume without the batch axis
    params: int
    formula: str


def same_padding(w1: int, f: int, s: int) -> int:
    """Total padding Keras's "same" adds so that W2 = ceil(W1 / S)."""
    return max((math.ceil(w1 / s) - 1) * s + f - w1, 0)


def _spatial(layer: keras.layers.Layer, w: int, f: int, s: int) -> tuple[int, int, str]:
    pad = same_padding(w, f, s) if getattr(layer, "padding", "valid") == "same" else 0
    out = conv_size(w, f, s, pad)
    if out != int(out) or out <= 0:
        raise ValueError(f"{layer.name}: W2 = ({w} - {f} + {pad})/{s} + 1 = {out:g} is not a positive whole number")
    return int(out), pad, f"({w} - {f} + {pad})/{s} + 1 = {int(out)}"


def layer_table(model: keras.Model) -> list[Row]:
    """One row per layer of a Sequential model built from the registry, computed from the formulas."""
    shape: tuple[int, ...] = tuple(int(d) for d in model.inputs[0].shape[1:])
    rows = [Row("input", "Input", shape, 0, "raw pixels")]
    for layer in model.layers:
        kind = type(layer).__name__
        params, formula = 0, "same volume"
        if isinstance(layer, keras.layers.Reshape):
            shape, formula = tuple(layer.target_shape), "reshape"
        elif isinstance(layer, keras.layers.Flatten):
            shape, formula = (math.prod(shape),), f"{' x '.join(map(str, shape))} = {math.prod(shape)}"
        elif isinstance(layer, keras.layers.ZeroPadding2D):
            (top, bottom), (left, right) = layer.padding
            shape = (shape[0] + top + bottom, shape[1] + left + right, shape[2])
            formula = f"pad P = {top}: {shape[0] - top - bottom} + 2P"
        elif isinstance(layer, keras.layers.Dense):
            n1 = shape[-1]
            params = n1 * layer.units + (layer.units if layer.use_bias else 0)
            shape = (*shape[:-1], layer.units)
            formula = f"{n1}*{layer.units} weights + {layer.units if layer.use_bias else 0} biases"
        elif isinstance(layer, (keras.layers.Conv2D, SparseConv2D)):
            f, s = layer.kernel_size[0], layer.strides[0]
            h, _, text = _spatial(layer, shape[0], f, s)
            w, _, _ = _spatial(layer, shape[1], layer.kernel_size[1], layer.strides[1])
            d1, k = shape[2], layer.filters
            if isinstance(layer, SparseConv2D):
                links = int(layer.connections.sum())
                params = f * f * links + k
                formula = f"W2 = {text}; ({f}*{f})*{links} connected map pairs + {k} biases"
            else:
                params = f * f * d1 * k + k
                formula = f"W2 = {text}; ({f}*{f}*{d1})*{k} weights + {k} biases"
            shape = (h, w, k)
        elif isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, SubSampling)):
            f, s = layer.pool_size[0], layer.strides[0]
            h, _, text = _spatial(layer, shape[0], f, s)
            w, _, _ = _spatial(layer, shape[1], layer.pool_size[1], layer.strides[1])
            shape = (h, w, shape[2])
            params = 2 * shape[2] if isinstance(layer, SubSampling) else 0
            formula = f"W2 = {text}" + ("; a coefficient and a bias per map" if params else "; no parameters")
        rows.append(Row(layer.name, kind, shape, params, formula))
    return rows


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """The table as text: aligned columns for a terminal, or markdown for TensorBoard."""
    header = ["layer", "type", "output volume", "parameters", "formula"]
    cells = [[r.name, r.kind, " x ".join(map(str, r.shape)), f"{r.params:,}", r.formula] for r in rows]
    cells.append(["total", "", "", f"{sum(r.params for r in rows):,}", ""])
    return tables.markdown(header, cells) if markdown else tables.columns(header, cells)
