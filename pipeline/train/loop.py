"""Train one registry model with Keras `fit`: seeded, resumable, observable.

Reproducible and resumable bit for bit: every epoch's randomness comes from (seed, epoch)
alone — the order of the training images is a stateless shuffle keyed by (seed, epoch)
(inputs.py), and every dropout layer's seed-generator state is reset from (seed, layer,
epoch) when the epoch begins (callbacks.EpochSeeds) — and after every epoch the model with
its optimizer state is saved atomically to the resume folder (checkpoints.py). A killed run
started again continues from the last completed epoch and ends with the weights of an
uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from pipeline import artifacts, tables
from pipeline.config import ModelParams, TrainParams, params_hash
from pipeline.data import Split, atomic_path, disk_bytes
from pipeline.mnist import IMAGE_SHAPE
from pipeline.models import registry
from pipeline.models.arithmetic import format_table, layer_table
from pipeline.train.callbacks import DeadReLU, EpochLog, EpochSeeds, LiveMetrics, NaNGuard
from pipeline.train.checkpoints import Checkpoint, fingerprint, latest_checkpoint
from pipeline.train.inputs import eval_batches, training_batches
from pipeline.train.optimizers import make_optimizer
from pipeline.train.precision import dtype_policy, training_policy

log = logging.getLogger(__name__)

DEAD_RELU_PROBE = 1000  # validation images used to count dead ReLU units
VALIDATION_BATCH = 1000  # inference batch for the validation pass; does not change any result


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; make TF's kernels deterministic if asked."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


@contextmanager
def keras_seeds_from(seed: int) -> Iterator[None]:
    """Inside: Keras draws the seed of every unseeded initializer and dropout layer from a private
    generator seeded with `seed`, not from Python's global `random`.

    Other threads draw from the global one at times that vary: in a stage process, Prefect's events
    client does (its websocket's keepalive pings call random.getrandbits). One such draw while the
    model is built changes its initial weights: the CNN's first-epoch loss was 0.383181 instead of
    0.347216 in 1 stage run of 4 under load. The private generator yields what the global one yields
    right after `keras.utils.set_random_seed(seed)` when no other thread draws, so the weights are
    those of an undisturbed run. Keras has no public setting for this source: the module attribute
    replaced here is where Keras's `make_default_seed` takes its numbers.
    """
    from keras.src.random import seed_generator  # the one private Keras module the project uses (tests/test_compat.py)

    shared = seed_generator.python_random
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = shared


def steps_per_call(steps_per_epoch: int, most: int) -> int:
    """The largest number of batches per tf.function call, at most `most`, that divides an epoch.

    Keras runs whole executions: one that crossed the end of an epoch would take the next
    epoch's first batches, and resuming at an epoch boundary would no longer be exact.
    """
    return max(d for d in range(1, most + 1) if steps_per_epoch % d == 0)


def compile_model(name: str, p: ModelParams, steps_per_epoch: int, steps_per_execution: int = 1) -> keras.Model:
    """Build and compile registry model `name`."""
    model = registry.build(name, p)
    model.compile(
        optimizer=make_optimizer(p, steps_per_epoch),
        loss=registry.loss(name),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution,
        jit_compile=False,  # XLA trained these models several times slower on CPUs
    )
    return model


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]  # per epoch: the Keras logs, plus "seconds" (see EpochLog)
    epochs_resumed: int
    seconds: float
    precision: str = "float32"  # the Keras dtype policy it trained in; `model` itself is float32
    device: str = "CPU"  # where it trained (training_device)


def start_or_resume(
    name: str, p: ModelParams, steps: int, per_call: int, resume_dir: Path, expected: str
) -> tuple[keras.Model, int, dict[str, list[float]]]:
    """The model to fit, the epoch to start at and the history so far: from the newest checkpoint
    with fingerprint `expected`, else a new model (clearing the resume folder: old checkpoints and
    the old run's TensorBoard events)."""
    found = latest_checkpoint(resume_dir, expected)
    if found:
        ckpt, state = found
        log.info("%s: resuming after epoch %d from %s", name, state["epochs_done"], ckpt)
        return artifacts.read_model(ckpt), state["epochs_done"], state["history"]
    shutil.rmtree(resume_dir, ignore_errors=True)
    return compile_model(name, p, steps, per_call), 0, {}


def train_model(
    name: str,
    p: ModelParams,
    seed: int,
    train: TrainParams,
    splits: dict[str, Split],
    data: Path,
    resume_dir: Path,
    live: Path | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> TrainResult:
    """Train model `name` on the train split, validating on val; resume from `resume_dir` if possible.

    `data` is the prepared-data folder the splits came from: a checkpoint made from other data is not
    resumed. TensorBoard events go to the resume folder (artifacts.live_tensorboard) until save_trained
    moves them into place, so that a resumed run keeps the events of the epochs before the interruption.
    `live`, if given, is DVCLive's folder for the per-epoch metrics, written as the epochs end.
    """
    seed_everything(seed, train.deterministic)
    train_split, val = splits["train"], splits["val"]
    steps = math.ceil(len(train_split.y) / p.batch_size)
    per_call = steps_per_call(steps, train.steps_per_execution)
    strategy = tf.distribute.MirroredStrategy() if train.strategy == "mirrored" else tf.distribute.get_strategy()
    expected = fingerprint(name, p, seed, train, Path(data) / artifacts.PREPARED_FILE)
    device = training_device(train)
    policy = training_policy(p.precision)
    log.info("%s: training on %s in %s (models.%s.precision: %s)", name, device, policy, name, p.precision)
    with strategy.scope(), keras_seeds_from(seed), dtype_policy(policy):
        model, first_epoch, history = start_or_resume(name, p, steps, per_call, resume_dir, expected)
    resume_dir.mkdir(parents=True, exist_ok=True)
    tensorboard = artifacts.live_tensorboard(resume_dir)
    if first_epoch == 0:
        write_model_text(model, p, tensorboard / "train")
    live_metrics = [LiveMetrics(live, history)] if live is not None else []

    start = time.perf_counter()
    if first_epoch < p.epochs:
        model.fit(
            training_batches(train_split, p.batch_size, seed, first_epoch, p.epochs, p.shift),
            validation_data=eval_batches(val, VALIDATION_BATCH),
            epochs=p.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps,
            shuffle=False,  # the dataset shuffles itself, by (seed, epoch)
            verbose=1 if sys.stdout.isatty() else 0,  # a live progress bar in a terminal; EpochLog prints each epoch once
            callbacks=[
                EpochSeeds(seed),
                NaNGuard(name, p.learning_rate),
                EpochLog(name, p.epochs),
                *live_metrics,
                DeadReLU(val.x[:DEAD_RELU_PROBE], tensorboard / "train"),
                keras.callbacks.TensorBoard(str(tensorboard), histogram_freq=1, write_graph=False),
                Checkpoint(resume_dir, expected, history),
                *(callbacks or []),
            ],
        )
    else:  # every epoch was done before the resume: nothing to fit, DVCLive's files are complete
        for callback in live_metrics:
            callback.live.end()  # type: ignore[no-untyped-call]  # dvclive's Live.end has no annotations
    seconds = time.perf_counter() - start
    with strategy.scope(), keras_seeds_from(seed):
        trained = as_float32(model, name, p, steps, per_call)
    return TrainResult(trained, history, first_epoch, seconds, policy, device)


def training_device(train: TrainParams) -> str:
    """Where training runs: the GPUs TensorFlow sees, else "CPU". With no GPU where one was expected
    (train.strategy mirrored, or CUDA_VISIBLE_DEVICES set), a warning says how to get one and how to
    see TensorFlow's own reason (pipeline/__init__.py quiets TensorFlow's C++ log)."""
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if not gpus and (train.strategy == "mirrored" or os.environ.get("CUDA_VISIBLE_DEVICES")):
        log.warning(
            "a GPU was expected (train.strategy %s, CUDA_VISIBLE_DEVICES %r) but TensorFlow sees none: training on the CPU. "
            "On a machine with an NVIDIA GPU and its driver, `make setup-gpu` installs TensorFlow's CUDA libraries; "
            "TF_CPP_MIN_LOG_LEVEL=0 shows TensorFlow's own reason.",
            train.strategy,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    return ", ".join(gpus) or "CPU"


def as_float32(model: keras.Model, name: str, p: ModelParams, steps: int, per_call: int) -> keras.Model:
    """`model` with float32 layers, the same weights and optimizer state (`model` itself if it is float32):
    evaluate and export then load a float32 model whatever the training's precision."""
    if model.dtype_policy.name == "float32":
        return model
    with dtype_policy("float32"):
        copy = compile_model(name, p, steps, per_call)
    copy.set_weights(model.get_weights())
    trained = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # mixed_float16 wraps it in a loss scaler
    copy.optimizer.name = trained.name  # not Keras's next automatic name: the saved config must not depend on a resume
    copy.optimizer.build(copy.trainable_variables)
    for target, value in zip(copy.optimizer.variables, trained.variables, strict=True):
        target.assign(value)
    return copy


def write_model_text(model: keras.Model, p: ModelParams, logdir: Path) -> None:
    """TensorBoard: the forward graph, the layer table (output volumes and parameters from the notes'
    formulas) and the params used, as text."""
    # Keras 3's TensorBoard callback no longer writes the graph: write the forward pass's graph here.
    forward = tf.function(lambda pixels: model(pixels, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32, name="pixels")).graph
    with tf.summary.create_file_writer(str(logdir)).as_default():
        tf.summary.graph(graph)
        tf.summary.text("model/layers", format_table(layer_table(model), markdown=True), step=0)
        tf.summary.text("model/params", tables.markdown(["key", "value"], [[k, v] for k, v in p.model_dump().items()]), step=0)


def training_meta(name: str, p: ModelParams, seed: int, result: TrainResult) -> dict[str, Any]:
    """meta.json: what was trained, with which params and versions (the same for the same inputs)."""
    spec = registry.REGISTRY[name]
    return {
        "model": name,
        "description": spec.description,
        "params": p.model_dump(),
        "params_hash": params_hash(p),
        "seed": seed,
        "loss": spec.loss,
        "parameters": int(result.model.count_params()),
        "epochs": p.epochs,
        "precision": result.precision,
        "device": result.device,
        "val_accuracy": result.history.get("val_accuracy", [None])[-1],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def training_timings(result: TrainResult) -> dict[str, Any]:
    """timings.json: seconds per epoch and in all (including epochs run before a resume)."""
    epoch_seconds = [round(s, 3) for s in result.history.get("seconds", [])]
    return {
        "train_seconds": round(sum(epoch_seconds), 2),
        "epoch_seconds": epoch_seconds,
        "epochs_resumed": result.epochs_resumed,
    }


def save_trained(
    result: TrainResult, name: str, p: ModelParams, seed: int, out: Path, resume_dir: Path, tensorboard: Path
) -> None:
    """Write the model folder (model.keras, meta.json, timings.json) as one atomic folder, move
    the run's TensorBoard events to `tensorboard`, then delete `resume_dir`: nothing is left to resume."""
    artifacts.write_model_folder(out, result.model, training_meta(name, p, seed, result), training_timings(result))
    shutil.rmtree(tensorboard, ignore_errors=True)
    tensorboard.parent.mkdir(parents=True, exist_ok=True)
    live = artifacts.live_tensorboard(resume_dir)
    if not live.is_dir():
        tensorboard.mkdir()
    elif live.stat().st_dev == tensorboard.parent.stat().st_dev:
        live.rename(tensorboard)
    else:  # data/resume on another file system: copy, then one rename
        with atomic_path(tensorboard, disk_bytes(live)) as tmp:
            shutil.copytree(live, tmp)
    shutil.rmtree(resume_dir, ignore_errors=True)
