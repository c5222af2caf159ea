"""Pictures of a model's results, drawn once for data/report.md and TensorBoard: confusion matrix,
training curves, mistakes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: files only, no display, no global figure list

from pipeline import artifacts
from pipeline.data import Split
from pipeline.evaluate.scores import Evaluation
from pipeline.mnist import NUM_CLASSES
from pipeline.summaries import figure_png


@dataclass(frozen=True)
class Pictures:
    """PNG bytes of one model's pictures."""

    confusion: bytes  # confusion.png, and TensorBoard's confusion_matrix
    curves: bytes  # curves.png
    misclassified: bytes  # TensorBoard's misclassified


def confusion_figure(confusion: np.ndarray, title: str) -> Figure:
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.subplots()
    ax.imshow(np.log1p(confusion), cmap="Blues")
    for (i, j), n in np.ndenumerate(confusion):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted", ylabel="true digit", title=title)
    return fig


def curves_figure(h: np.ndarray, title: str) -> Figure:
    """Loss and accuracy per epoch, train and validation; `h` is artifacts.read_history's array."""
    fig = Figure(figsize=(9, 3.4))
    left, right = fig.subplots(1, 2)
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        left.plot(h["epoch"], h[key], marker="o", label=label)
    for key, label in (("accuracy", "train"), ("val_accuracy", "validation")):
        right.plot(h["epoch"], h[key], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    right.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    left.legend(), right.legend()
    return fig


def misclassified_figure(test: Split, ev: Evaluation, count: int, columns: int = 10) -> Figure:
    """The first `count` misclassified test digits, each under "true D / pred P".

    One image with one label per digit, not a subplot per digit, which is several times slower to draw.
    """
    wrong = np.flatnonzero(ev.predictions != test.y)[:count]
    rows = max(1, -(-len(wrong) // columns))
    height, width = test.x.shape[1:3]
    label, gap = 10, 8  # pixels above each digit for its label, between digits
    cell_h, cell_w = label + height + gap, width + gap
    canvas = np.zeros((rows * cell_h, columns * cell_w), dtype=np.uint8)
    fig = Figure(figsize=(columns * cell_w / 33, rows * cell_h / 33))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for k, i in enumerate(wrong):
        top, left = (k // columns) * cell_h + label, (k % columns) * cell_w + gap // 2
        canvas[top : top + height, left : left + width] = test.x[i]
        ax.text(left + width / 2, top - 1, f"true {test.y[i]} / pred {ev.predictions[i]}", fontsize=6, ha="center", va="bottom")
    ax.imshow(canvas, cmap="gray_r")
    return fig


def write_report_pictures(ev: Evaluation, test: Split, live: Path, name: str, out: Path, grid: int) -> Pictures:
    """Draw the pictures; write confusion.png and curves.png in `out`, which data/report.md shows.

    The curves come from the per-epoch metrics DVCLive wrote in `live` during training; `grid` is
    how many mistakes the misclassified picture shows (params.yaml evaluate.misclassified_grid).
    """
    pictures = Pictures(
        confusion=figure_png(confusion_figure(ev.confusion, f"{name}: confusion matrix")),
        curves=figure_png(curves_figure(artifacts.read_history(live), name)),
        misclassified=figure_png(misclassified_figure(test, ev, grid)),
    )
    artifacts.write_evaluation_pictures(out, pictures.confusion, pictures.curves)
    return pictures
