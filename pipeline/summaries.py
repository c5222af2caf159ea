"""TensorBoard helpers shared by the stages: one run folder per stage and model or dataset.

The logdir layout is `data/tensorboard/<stage>/<model or dataset>/`; each stage's run is a
DVC output, so a re-run of a stage replaces its run instead of mixing with the old one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tensorflow as tf


def writer(logdir: Path | str) -> tf.summary.SummaryWriter:
    """A summary writer for one run folder."""
    return tf.summary.create_file_writer(str(logdir))


def digit_grid(images: np.ndarray, columns: int = 10, pad: int = 2) -> np.ndarray:
    """Tile uint8 [n, height, width] digits into one uint8 [1, H, W, 1] image for tf.summary.image."""
    n = len(images)
    rows = max(1, -(-n // columns))
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return grid[None, :, :, None]


def figure_png(fig) -> bytes:
    """Render a matplotlib figure (matplotlib.figure.Figure, which needs no pyplot) to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def png_to_tensor(png: bytes) -> tf.Tensor:
    """PNG bytes as a [1, H, W, C] tensor for tf.summary.image."""
    return tf.expand_dims(tf.io.decode_png(png), 0)
