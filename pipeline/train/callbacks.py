"""Keras callbacks of a training run: per-epoch seeds, a NaN guard, dead-ReLU counts, a log line, DVCLive."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from dvclive.keras import DVCLiveCallback
from dvclive.live import Live

from pipeline.errors import TrainingDiverged

log = logging.getLogger(__name__)


def derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (seed, layer, epoch, ...) alone."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def seeded_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers that draw random numbers (dropout and the like), in a fixed order."""
    return [layer for layer in all_layers(model) if hasattr(layer, "seed_generator")]


def all_layers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer inside `layer` (a model's layers, and theirs in turn), depth first, in the model's order."""
    for inner in getattr(layer, "layers", []):
        yield inner
        yield from all_layers(inner)


class EpochSeeds(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped: its classes are Any
    """Reset every random layer's seed-generator state from (seed, layer, epoch) at each epoch start."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for i, layer in enumerate(seeded_layers(self.model)):
            state = layer.seed_generator.state
            state.assign(np.array([derived_seed(self.seed, i, epoch), 0], dtype=state.dtype))


class NaNGuard(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped: its classes are Any
    """Stop with a clear error as soon as the loss is NaN or infinite."""

    def __init__(self, name: str, learning_rate: float) -> None:
        super().__init__()
        self.name, self.learning_rate, self.epoch = name, learning_rate, 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(
                f"model '{self.name}' diverged: the loss became {float(loss)} in epoch {self.epoch + 1}, batch {batch + 1}. "
                f"Lower models.{self.name}.learning_rate in params.yaml (now {self.learning_rate}) and run again."
            )


def relu_outputs(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers whose output is a ReLU activation."""
    relu = keras.activations.relu
    return [layer for layer in model.layers if getattr(layer, "activation", None) is relu or isinstance(layer, keras.layers.ReLU)]


def dead_fraction(activations: np.ndarray) -> float:
    """Fraction of units (last axis) that are 0 for every sample and position."""
    per_unit = activations.reshape(-1, activations.shape[-1]).max(axis=0)
    return float((per_unit <= 0).mean())


class DeadReLU(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped: its classes are Any
    """The fraction of dead ReLU units per layer per epoch (the notes' "monitor the fraction of dead
    neurons"): units that output 0 for every probe image."""

    def __init__(self, probe: np.ndarray, logdir: Path) -> None:
        super().__init__()
        self.probe = tf.constant(probe.astype(np.float32))
        self.logdir = logdir
        self.writer: Any = None
        self.probe_model: keras.Model | None = None
        self.names: list[str] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        relu_layers = relu_outputs(self.model)
        if relu_layers:
            self.names = [layer.name for layer in relu_layers]
            self.probe_model = keras.Model(self.model.inputs[0], [layer.output for layer in relu_layers])
            self.writer = tf.summary.create_file_writer(str(self.logdir))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.probe_model is None:
            return
        outputs = self.probe_model(self.probe, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        with self.writer.as_default():
            for name, out in zip(self.names, outputs):
                tf.summary.scalar(f"dead_relu/{name}", dead_fraction(out.numpy()), step=epoch)
        self.writer.flush()


class EpochLog(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped: its classes are Any
    """One log line per epoch (loss, accuracy, validation accuracy, seconds); adds seconds and learning rate to the logs."""

    def __init__(self, name: str, epochs: int) -> None:
        super().__init__()
        self.name, self.epochs, self.start = name, epochs, 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        logs["seconds"] = time.perf_counter() - self.start
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        log.info(
            "%s epoch %d/%d: loss %.4f, accuracy %.4f, val_accuracy %.4f, %.1f s",
            self.name,
            epoch + 1,
            self.epochs,
            logs.get("loss", float("nan")),
            logs.get("accuracy", float("nan")),
            logs.get("val_accuracy", float("nan")),
            logs["seconds"],
        )


class LiveMetrics(DVCLiveCallback):
    """DVCLive's Keras callback writing to `folder`: after every epoch, one row per metric in
    plots/metrics/{train,eval}/<metric>.tsv and the latest values in metrics.json, which `dvc exp show`
    reads while the experiment runs.

    Two changes to the library's callback: the epoch's wall-clock `seconds` are left out (they differ
    between identical runs; timings.json has them), and the epochs `done` before a resume are written
    again first, from the checkpoint's history, so a resumed run ends with the files of an
    uninterrupted one (DVC deletes a stage's outputs before it runs, and a kill can fall between
    DVCLive's row and the checkpoint). DVCLive writes no dvc.yaml and saves no experiment of its own:
    dvc.yaml declares these files, and `dvc exp run` makes the experiments.
    """

    def __init__(self, folder: Path, done: dict[str, list[float]]) -> None:
        super().__init__(live=Live(str(folder), save_dvc_exp=False, dvcyaml=None))
        for epoch in range(len(done.get("loss", []))):
            self.on_epoch_end(epoch, {key: values[epoch] for key, values in done.items()})

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch, {key: value for key, value in (logs or {}).items() if key != "seconds"})
