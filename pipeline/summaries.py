"""TensorBoard helpers shared by the stages: one run folder per stage and model or dataset.

The logdir layout is `data/tensorboard/<stage>/<model or dataset>/`; each stage's run is a
DVC output, so a re-run of a stage replaces its run instead of mixing with the old one.

`EventWriter` writes a run without TensorFlow: TensorBoard's own protobuf helpers make each
summary as `tf.summary` makes it (same plugin, tensor dtype and shape), and TensorBoard's record
writer frames the events. TensorBoard's `EventFileWriter` is not used: it opens its file through
`tensorboard.compat.tf`, which imports TensorFlow wherever it is installed. The stages that run
TensorFlow anyway (train, evaluate, export) keep `writer`, TensorFlow's summary writer.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import struct
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram.summary_v2 import histogram_pb
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

if TYPE_CHECKING:
    import tensorflow as tf
    from matplotlib.figure import Figure

_file_ids = itertools.count()  # tells apart two writers of one process opened in the same second


class EventWriter:
    """One event file in a run folder, written as TensorFlow's summary writer writes it; a context
    manager that closes (and syncs) the file. Every summary is at step 0 unless given one."""

    def __init__(self, logdir: Path | str) -> None:
        folder = Path(logdir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}.v2"
        self._file = open(folder / name, "wb")
        self._records = RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def add(self, summary: summary_pb2.Summary, step: int = 0) -> None:
        """Write one summary proto (e.g. from TensorBoard's `*_pb` helpers) as an event at `step`."""
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def scalar(self, tag: str, value: float, step: int = 0) -> None:
        """A scalar, float32 as `tf.summary.scalar` writes it."""
        self.add(scalar_pb(tag, value), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text (markdown), one string as `tf.summary.text` writes it."""
        self.add(text_pb(tag, text), step)

    def histogram(self, tag: str, values: np.ndarray, buckets: int, step: int = 0) -> None:
        """A histogram: [buckets, 3] float64 rows (left edge, right edge, count) as `tf.summary.histogram` writes."""
        self.add(histogram_pb(tag, values, buckets=buckets), step)

    def image(self, tag: str, images: np.ndarray, step: int = 0) -> None:
        """uint8 [k, height, width, channels] images as `tf.summary.image` writes them (at most 3)."""
        self.add(image_pb(tag, [png(img) for img in images[:3]], width=images.shape[2], height=images.shape[1]), step)

    def close(self) -> None:
        """Write everything to disk and close the file."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._records.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def image_pb(tag: str, pngs: Sequence[bytes], width: int, height: int) -> summary_pb2.Summary:
    """An image summary of PNG images of one size: the string tensor [width, height, png...] of `tf.summary.image`."""
    tensor = tensor_util.make_tensor_proto([str(width).encode(), str(height).encode(), *pngs], dtype=np.object_)
    summary = summary_pb2.Summary()
    metadata = image_metadata.create_summary_metadata(display_name=None, description=None)
    summary.value.add(tag=tag, metadata=metadata, tensor=tensor)
    return summary


def png(pixels: np.ndarray) -> bytes:
    """uint8 [height, width, channels] pixels (1 grey, 2 grey and alpha, 3 RGB, 4 RGBA) as PNG bytes."""
    height, width, channels = pixels.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.astype(np.uint8).reshape(height, width * channels)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)  # 8 bits, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")


def writer(logdir: Path | str) -> tf.summary.SummaryWriter:
    """TensorFlow's summary writer for one run folder (for the stages that import TensorFlow anyway)."""
    import tensorflow as tf

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


def figure_png(fig: Figure) -> bytes:
    """Render a matplotlib figure (matplotlib.figure.Figure, which needs no pyplot) to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def png_to_tensor(encoded: bytes) -> tf.Tensor:
    """PNG bytes as a [1, H, W, C] tensor for tf.summary.image."""
    import tensorflow as tf

    return tf.expand_dims(tf.io.decode_png(encoded), 0)
