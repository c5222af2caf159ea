"""Train one registry model with Keras `fit`: seeded, resumable, observable.

Reproducible and resumable bit for bit: every epoch's randomness comes from (seed, epoch)
alone — the order of the training images is a stateless shuffle keyed by (seed, epoch),
and every dropout layer's seed-generator state is reset from (seed, layer, epoch) when the
epoch begins — and after every epoch the model with its optimizer state is saved
atomically to the resume folder. A killed run started again continues from the last
completed epoch and ends with the weights of an uninterrupted run.

The resume folder (`data/resume/<model>/`) is not a DVC output: DVC records a train stage
only when it exits successfully, after the final outputs are written, and the stage then
deletes the resume folder. A checkpoint whose params, data or TensorFlow version differ
from the current ones is discarded, never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline import models
from pipeline.config import ModelParams, Params, params_hash
from pipeline.data import PREPARED_FILE, Split, atomic_path
from pipeline.errors import TrainingDiverged

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
META_FILE = "meta.json"
STATE_FILE = "state.json"
DEAD_RELU_PROBE = 1000  # validation images used to count dead ReLU units


# --- randomness -----------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; make TF's kernels deterministic if asked."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (seed, layer, epoch, ...) alone."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# tf.data's autotuner is off: its optimisation thread, by then waking only every 60 s, made the
# iterator's teardown at the end of `fit` wait up to a minute (seen here: 8-50 s per train stage).
# Gathering a batch is one cheap op, so a fixed parallelism of 2 and 2 prefetched batches suffice.
FIXED_PIPELINE = tf.data.Options()
FIXED_PIPELINE.autotune.enabled = False


def training_batches(split: Split, batch_size: int, seed: int, first_epoch: int, epochs: int) -> tf.data.Dataset:
    """Batches of (float32 pixels, int32 labels) for epochs first_epoch..epochs-1.

    Each epoch is one pass over a permutation keyed by (seed, epoch), so resuming at
    epoch k yields exactly the batches an uninterrupted run sees from epoch k on.
    """
    x = tf.constant(split.x)
    y = tf.constant(split.y.astype(np.int32))
    n = len(split.y)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    return (
        tf.data.Dataset.range(first_epoch, epochs)
        .flat_map(one_epoch)
        .map(lambda idx: (tf.cast(tf.gather(x, idx), tf.float32), tf.gather(y, idx)), num_parallel_calls=2)
        .prefetch(2)
        .with_options(FIXED_PIPELINE)
    )


def eval_batches(split: Split, batch_size: int) -> tf.data.Dataset:
    """Batches of a split in file order, for validation and evaluation."""
    ds = tf.data.Dataset.from_tensor_slices((split.x, split.y.astype(np.int32))).batch(batch_size)
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).cache().prefetch(2).with_options(FIXED_PIPELINE)


# --- compile --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="pipeline")
def onehot_mse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Mean squared error between the outputs and one-hot targets: least-squares classification."""
    target = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), models.NUM_CLASSES)
    return tf.reduce_mean(tf.square(target - y_pred), axis=-1)


def make_optimizer(p: ModelParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer named in params, with its learning-rate schedule (stepped per batch)."""
    lr: Any = p.learning_rate
    if p.lr_schedule == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(p.learning_rate, steps_per_epoch, p.lr_decay)
    elif p.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(p.learning_rate, steps_per_epoch * p.epochs)
    if p.optimizer == "sgd":
        return keras.optimizers.SGD(lr)
    if p.optimizer == "momentum":
        return keras.optimizers.SGD(lr, momentum=p.momentum)
    if p.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr, rho=p.momentum)
    return keras.optimizers.Adam(lr)


def steps_per_call(steps_per_epoch: int, most: int) -> int:
    """The largest number of batches per tf.function call, at most `most`, that divides an epoch.

    Keras runs whole executions: one that crossed the end of an epoch would take the next
    epoch's first batches, and resuming at an epoch boundary would no longer be exact.
    """
    return max(d for d in range(1, most + 1) if steps_per_epoch % d == 0)


def compile_model(name: str, p: ModelParams, steps_per_epoch: int, steps_per_execution: int = 1) -> keras.Model:
    """Build and compile registry model `name`."""
    model = models.build(name, p)
    loss = onehot_mse if models.REGISTRY[name].loss == "mse" else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=make_optimizer(p, steps_per_epoch),
        loss=loss,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution,
        jit_compile=False,  # XLA measured 5x slower on these CPUs
    )
    return model


# --- callbacks ------------------------------------------------------------------------


def seeded_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers that draw random numbers (dropout and the like), in a fixed order."""
    return [layer for layer in model._flatten_layers(include_self=False) if hasattr(layer, "seed_generator")]


class EpochSeeds(keras.callbacks.Callback):
    """Reset every random layer's seed-generator state from (seed, layer, epoch) at each epoch start."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for i, layer in enumerate(seeded_layers(self.model)):
            state = layer.seed_generator.state
            state.assign(np.array([derived_seed(self.seed, i, epoch), 0], dtype=state.dtype))


class NaNGuard(keras.callbacks.Callback):
    """Stop with a clear error as soon as the loss is NaN or infinite."""

    def __init__(self, name: str, learning_rate: float):
        super().__init__()
        self.name, self.learning_rate, self.epoch = name, learning_rate, 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(
                f"model '{self.name}' diverged: the loss became {float(loss)} in epoch {self.epoch + 1}, batch {batch + 1}. "
                f"Lower models.{self.name}.learning_rate in params.yaml (now {self.learning_rate}) and run again."
            )


class DeadReLU(keras.callbacks.Callback):
    """The fraction of dead ReLU units per layer per epoch: units that output 0 for every probe image."""

    def __init__(self, probe: np.ndarray, logdir: Path):
        super().__init__()
        self.probe = tf.constant(probe.astype(np.float32))
        self.logdir = logdir
        self.writer: Any = None
        self.probe_model: keras.Model | None = None
        self.names: list[str] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        relu_layers = relu_outputs(self.model)
        if relu_layers:
            self.names = [layer.name for layer in relu_layers]
            self.probe_model = keras.Model(self.model.inputs[0], [layer.output for layer in relu_layers])
            self.writer = tf.summary.create_file_writer(str(self.logdir))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.probe_model is None:
            return
        outputs = self.probe_model(self.probe, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        with self.writer.as_default():
            for name, out in zip(self.names, outputs):
                fraction = dead_fraction(out.numpy())
                tf.summary.scalar(f"dead_relu/{name}", fraction, step=epoch)
        self.writer.flush()


def relu_outputs(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers whose output is a ReLU activation."""
    relu = keras.activations.relu
    return [
        layer
        for layer in model.layers
        if getattr(layer, "activation", None) is relu or isinstance(layer, keras.layers.ReLU)
    ]


def dead_fraction(activations: np.ndarray) -> float:
    """Fraction of units (last axis) that are 0 for every sample and position."""
    per_unit = activations.reshape(-1, activations.shape[-1]).max(axis=0)
    return float((per_unit <= 0).mean())


class EpochLog(keras.callbacks.Callback):
    """One log line per epoch: loss, accuracy, validation accuracy, seconds."""

    def __init__(self, name: str, epochs: int):
        super().__init__()
        self.name, self.epochs, self.start = name, epochs, 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        logs["seconds"] = time.perf_counter() - self.start
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        log.info(
            "%s epoch %d/%d: loss %.4f, accuracy %.4f, val_accuracy %.4f, %.1f s",
            self.name, epoch + 1, self.epochs, logs.get("loss", float("nan")), logs.get("accuracy", float("nan")),
            logs.get("val_accuracy", float("nan")), logs["seconds"],
        )


class Checkpoint(keras.callbacks.Callback):
    """After every epoch, save the model, its optimizer state and the history so far, atomically."""

    def __init__(self, folder: Path, fingerprint: str, history: dict[str, list[float]]):
        super().__init__()
        self.folder, self.fingerprint, self.history = folder, fingerprint, history

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        target = self.folder / f"epoch-{epoch + 1:04d}"
        with atomic_path(target) as tmp:
            tmp.mkdir()
            self.model.save(tmp / MODEL_FILE)
            state = {"epochs_done": epoch + 1, "fingerprint": self.fingerprint, "history": self.history}
            (tmp / STATE_FILE).write_text(json.dumps(state))
        for old in self.folder.glob("epoch-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)


# --- resume ---------------------------------------------------------------------------


def fingerprint(name: str, p: ModelParams, params: Params, data_dir: Path) -> str:
    """What a checkpoint must match to be resumed: model, its params, seed, data, TF version."""
    data = data_dir / PREPARED_FILE
    stat = data.stat()
    parts = [name, params_hash(p), params_hash(params.train), str(params.seed), f"{stat.st_size}:{stat.st_mtime_ns}", tf.__version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def latest_checkpoint(folder: Path, expected: str) -> tuple[Path, dict] | None:
    """The newest complete checkpoint in `folder` made with the same fingerprint, if any."""
    for ckpt in sorted(folder.glob("epoch-*"), reverse=True):
        try:
            state = json.loads((ckpt / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if state.get("fingerprint") == expected and (ckpt / MODEL_FILE).is_file():
            return ckpt, state
        log.info("discarding checkpoint %s: it was made with other params, data or TensorFlow", ckpt)
    return None


# --- the training run -------------------------------------------------------------------


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    epochs_resumed: int
    seconds: float


def train_model(
    name: str,
    params: Params,
    splits: dict[str, Split],
    data_dir: Path,
    resume_dir: Path,
    tensorboard: Path,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> TrainResult:
    """Train model `name` on the train split, validating on val; resume from `resume_dir` if possible."""
    p = params.model(name)
    seed_everything(params.seed, params.train.deterministic)
    train, val = splits["train"], splits["val"]
    steps = math.ceil(len(train.y) / p.batch_size)
    per_call = steps_per_call(steps, params.train.steps_per_execution)
    strategy = tf.distribute.MirroredStrategy() if params.train.strategy == "mirrored" else tf.distribute.get_strategy()

    expected = fingerprint(name, p, params, data_dir)
    found = latest_checkpoint(resume_dir, expected)
    with strategy.scope():
        if found:
            ckpt, state = found
            model = keras.models.load_model(ckpt / MODEL_FILE)
            first_epoch, history = state["epochs_done"], state["history"]
            log.info("%s: resuming after epoch %d from %s", name, first_epoch, ckpt)
        else:
            shutil.rmtree(resume_dir, ignore_errors=True)
            shutil.rmtree(tensorboard, ignore_errors=True)  # a fresh run replaces the old TensorBoard run
            model = compile_model(name, p, steps, per_call)
            first_epoch, history = 0, {}
    resume_dir.mkdir(parents=True, exist_ok=True)
    if first_epoch == 0:
        write_model_text(model, name, p, tensorboard / "train")

    start = time.perf_counter()
    if first_epoch < p.epochs:
        model.fit(
            training_batches(train, p.batch_size, params.seed, first_epoch, p.epochs),
            validation_data=eval_batches(val, 1000),
            epochs=p.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps,
            shuffle=False,  # the dataset shuffles itself, by (seed, epoch)
            verbose=1 if sys.stdout.isatty() else 2,  # a live progress bar in a terminal, one line per epoch in a log
            callbacks=[
                EpochSeeds(params.seed),
                NaNGuard(name, p.learning_rate),
                EpochLog(name, p.epochs),
                DeadReLU(val.x[:DEAD_RELU_PROBE], tensorboard / "train"),
                keras.callbacks.TensorBoard(str(tensorboard), histogram_freq=1, write_graph=False),
                Checkpoint(resume_dir, expected, history),
                *(callbacks or []),
            ],
        )
    return TrainResult(model, history, first_epoch, time.perf_counter() - start)


def write_model_text(model: keras.Model, name: str, p: ModelParams, logdir: Path) -> None:
    """TensorBoard text: the layer table (output volume and parameters, from the seed's formulas) and the params used."""
    from pipeline.layer_table import format_table, layer_table
    from pipeline.summaries import markdown_table

    # Keras 3's TensorBoard callback no longer writes the graph: write the forward pass's graph here.
    forward = tf.function(lambda pixels: model(pixels, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec([None, 28, 28], tf.float32, name="pixels")).graph
    with tf.summary.create_file_writer(str(logdir)).as_default():
        tf.summary.graph(graph)
        tf.summary.text("model/layers", format_table(layer_table(model), markdown=True), step=0)
        tf.summary.text("model/params", markdown_table(["key", "value"], [[k, v] for k, v in p.model_dump().items()]), step=0)


def save_outputs(result: TrainResult, name: str, p: ModelParams, params: Params, out: Path) -> None:
    """Write model.keras, history.csv and meta.json into `out` as one atomic folder."""
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        result.model.save(tmp / MODEL_FILE)
        keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds") if k in result.history]
        lines = ["epoch," + ",".join(keys)]
        for i in range(len(result.history.get("loss", []))):
            lines.append(f"{i + 1}," + ",".join(f"{result.history[k][i]:.6g}" for k in keys))
        (tmp / HISTORY_FILE).write_text("\n".join(lines) + "\n")
        meta = {
            "model": name,
            "description": models.REGISTRY[name].description,
            "params": p.model_dump(),
            "params_hash": params_hash(p),
            "seed": params.seed,
            "loss": models.REGISTRY[name].loss,
            "parameters": int(result.model.count_params()),
            "epochs": p.epochs,
            "epochs_resumed": result.epochs_resumed,
            "train_seconds": round(sum(result.history.get("seconds", [])), 2),
            "val_accuracy": result.history.get("val_accuracy", [None])[-1],
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)


def load_meta(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / META_FILE).read_text())


def load_trained(model_dir: Path) -> keras.Model:
    """Load a trained model written by save_outputs."""
    return keras.models.load_model(Path(model_dir) / MODEL_FILE)
