"""Pictures of a model's results for data/report.md and TensorBoard: confusion matrix, training curves, mistakes."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from pipeline import artifacts
from pipeline.data import Split
from pipeline.evaluate.scores import Evaluation
from pipeline.mnist import NUM_CLASSES
from pipeline.summaries import figure_png

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend


def confusion_figure(confusion: np.ndarray, title: str):
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(np.log1p(confusion), cmap="Blues")
    for (i, j), n in np.ndenumerate(confusion):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted", ylabel="true digit", title=title)
    return fig


def curves_figure(h: np.ndarray, title: str):
    """Loss and accuracy per epoch, train and validation; `h` is artifacts.read_history's array."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        left.plot(h["epoch"], h[key], marker="o", label=label)
    for key, label in (("accuracy", "train"), ("val_accuracy", "validation")):
        right.plot(h["epoch"], h[key], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    right.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    left.legend(), right.legend()
    return fig


def misclassified_figure(test: Split, ev: Evaluation, count: int):
    wrong = np.flatnonzero(ev.predictions != test.y)[:count]
    cols = 10
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(test.x[i], cmap="gray_r")
        ax.set_title(f"true {test.y[i]} / pred {ev.predictions[i]}", fontsize=6)
    return fig


def write_report_pictures(ev: Evaluation, live: Path, name: str, out: Path) -> None:
    """confusion.png and curves.png in `out`, which data/report.md shows: from the test results and the
    per-epoch metrics DVCLive wrote in `live` during training."""
    confusion = figure_png(confusion_figure(ev.confusion, f"{name}: confusion matrix"))
    curves = figure_png(curves_figure(artifacts.read_history(live), name))
    artifacts.write_evaluation_pictures(out, confusion, curves)
