"""Benchmark 1: training throughput per model, the project's train code vs a plain Keras `fit`.

Every variant trains the same architecture (pipeline.models.registry.build with params.yaml's
block), at the same batch size, on the same images (data/prepared/mnist.npz if present, else
synthetic), in this one process, alternating A, B, C, A, B, C ... over the rounds.

    project      pipeline.train.loop.compile_model + fit(pipeline.train.inputs.training_batches(...),
                 steps_per_epoch=...) with the project's cheap callbacks (pipeline.train.callbacks'
                 EpochSeeds, NaNGuard, EpochLog), TF op determinism as params.yaml says, no
                 validation: the training loop
    plain        what a user writes: model.compile(<same optimizer>, <same loss>, metrics) and
                 model.fit(x_float32, y, batch_size=bs, epochs=..., shuffle=True, verbose=0),
                 no determinism
    train_model  pipeline.train.loop.train_model itself, validating on all 5,000 validation images:
                 TensorBoard (histograms), DeadReLU and a checkpoint after every epoch included;
                 in float32 whatever params.yaml's precision, as the two above

One measurement is one `fit` call of 1 + k epochs. The first epoch (tracing, iterator start)
is not timed. In the k others StepTimer notes when each step (or execution of
steps_per_execution steps) ends, without switching off Keras's asynchronous callbacks:

    steady rate      samples/s from the first to the last step end of each timed epoch
    epoch overhead   an epoch's wall time minus its steps at the steady rate: iterator start
                     and teardown, per-epoch callbacks, validation, checkpoints
    full epoch       samples/s over one real epoch (all training images), estimated as
                     steps x step time + epoch overhead: the measured epochs are shorter than
                     real ones, so their per-epoch costs are spread over the real epoch's steps

A variant's figures are its best round (highest rate, lowest overhead): work of other
processes only slows a round down. The settings search (full run, SEARCH_MODELS) adds
variants of the project's loop: other steps_per_execution, no per-batch NaNGuard, no op
determinism, tf.data's autotuner on, and thread settings in child processes (threads can
only be set before TensorFlow starts).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from benchmarks.common import PYTHON, REPO, Context, Row, child_env

# steps_per_execution tried for every model (full, quick). 10 divides both an epoch of the full
# data (430 steps of 128) and of the tests' 1,200 images (10 steps): train_model requires that.
CANDIDATE_SPE = {False: 10, True: 4}
SEARCH_MODELS = ("logreg", "cnn")  # the settings search: a small model and the CNN
SEARCH_SPE = (43, 86)  # other divisors of 430; kept where a measured epoch has two executions of them
THREADS = ((0, 0), (2, 1))  # (intra-op, inter-op) threads per child process; 0 = TensorFlow's default
TARGET_S = {False: 1.0, True: 0.15}  # timed seconds per measurement (full, quick)
ROUNDS = {False: 3, True: 1}


@dataclass(frozen=True)
class Variant:
    """One way of training a model; None means: as params.yaml says."""

    label: str
    kind: Literal["project", "plain", "train_model"]
    spe: int | None = None
    nan_guard: bool = True
    deterministic: bool | None = None
    autotune: bool = False  # tf.data's autotuner picks parallelism and prefetch, as in Keras's numpy path


@dataclass(frozen=True)
class Timing:
    """One measurement: the rate within epochs and what each epoch costs on top."""

    steady: float  # samples/s between the first and the last step end of the timed epochs
    epoch_overhead_s: float  # per epoch, beyond its steps at the steady rate

    def full_epoch(self, samples: int, batch_size: int) -> float:
        """Samples/s over one epoch of `samples` images: its steps at the steady rate plus the epoch overhead."""
        seconds = math.ceil(samples / batch_size) * batch_size / self.steady + self.epoch_overhead_s
        return samples / seconds


Runner = Callable[[int, int], Timing]  # (steps per epoch, timed epochs) -> Timing


# --- data ------------------------------------------------------------------------------------


@dataclass
class Data:
    splits: dict  # name -> pipeline.data.Split
    folder: Path  # holds mnist.npz (train_model's fingerprint reads it)
    source: str


def load_data(ctx: Context) -> Data:
    """The prepared MNIST arrays if the pipeline made them, else synthetic ones of the same shapes."""
    from pipeline.artifacts import PREPARED_FILE, load_prepared, save_prepared
    from pipeline.data import Split

    if "data" in ctx.shared:
        return ctx.shared["data"]
    folder = REPO / "data" / "prepared"
    if (folder / PREPARED_FILE).exists():
        data = Data(load_prepared(folder), folder, "real MNIST (data/prepared)")
    else:
        rng = np.random.default_rng(0)
        splits = {
            name: Split(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
            for name, n in (("train", 55_000), ("val", 5_000), ("test", 10_000))
        }
        folder = ctx.tmp / "synthetic-prepared"
        save_prepared(folder, splits)
        data = Data(splits, folder, "synthetic images (no data/prepared/mnist.npz)")
    ctx.shared["data"] = data
    return data


def subset(split, n: int):
    from pipeline.data import Split

    return Split(split.x[:n], split.y[:n])


def autotuned_batches(split, batch_size: int, seed: int, epochs: int):
    """pipeline.train.inputs.training_batches with tf.data's autotuner on (AUTOTUNE map and prefetch), for comparison."""
    import tensorflow as tf

    x, y, n = tf.constant(split.x), tf.constant(split.y.astype(np.int32)), len(split.y)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    def gather(idx):
        return tf.cast(tf.gather(x, idx), tf.float32), tf.gather(y, idx)

    return (
        tf.data.Dataset.range(0, epochs)
        .flat_map(one_epoch)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


# --- timing -----------------------------------------------------------------------------------


def step_timer():
    """A Keras callback noting each epoch's begin, each step's end and the epoch's end (pass it last)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        async_safe = True  # Keras keeps dispatching batch ends asynchronously, as it would without this callback

        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[tuple[float, list[tuple[int, float]], float]] = []
            self.begin, self.marks = 0.0, []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.begin, self.marks = time.perf_counter(), []

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.marks.append((batch, time.perf_counter()))  # called once the step's outputs exist

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.epochs.append((self.begin, sorted(self.marks), time.perf_counter()))

    return StepTimer()


def timing(timer, batch_size: int) -> Timing:
    """Steady rate and epoch overhead from a StepTimer's epochs, the first one left out."""
    span = steps = 0.0
    for _, marks, _ in timer.epochs[1:]:
        (first, t0), (last, t1) = marks[0], marks[-1]
        span, steps = span + t1 - t0, steps + last - first
    step_s = span / steps
    overheads = [end - begin - (marks[-1][0] + 1) * step_s for begin, marks, end in timer.epochs[1:]]
    return Timing(batch_size / step_s, statistics.mean(overheads))


def set_determinism(on: bool) -> None:
    """Switch TF op determinism on or off for what runs next (project: as params.yaml; plain: off).
    TensorFlow's public API only switches it on: off is its private config module (tests/test_compat.py)."""
    import tensorflow as tf

    if on:
        tf.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework import config

        config.disable_op_determinism()


# --- the variants -----------------------------------------------------------------------------


def project_runner(name: str, params, data: Data, v: Variant) -> Runner:
    """compile_model + fit(training_batches) with EpochSeeds, NaNGuard (unless switched off), EpochLog."""
    from pipeline.train.callbacks import EpochLog, EpochSeeds, NaNGuard
    from pipeline.train.inputs import training_batches
    from pipeline.train.loop import compile_model

    p = params.model(name)
    spe = v.spe or params.train.steps_per_execution
    deterministic = params.train.deterministic if v.deterministic is None else v.deterministic
    model = compile_model(name, p, 430, spe)

    def run(steps: int, timed: int) -> Timing:
        set_determinism(deterministic)
        timer = step_timer()
        callbacks = [EpochSeeds(params.seed), EpochLog(name, 1 + timed)]
        if v.nan_guard:
            callbacks.append(NaNGuard(name, p.learning_rate))
        # Keras runs whole executions: where spe does not divide steps, an epoch takes batches of
        # the next, so the data holds enough epochs for all executions.
        data_epochs = math.ceil((1 + timed) * math.ceil(steps / spe) * spe / steps)
        split = subset(data.splits["train"], steps * p.batch_size)
        if v.autotune:
            batches = autotuned_batches(split, p.batch_size, params.seed, data_epochs)
        else:
            batches = training_batches(split, p.batch_size, params.seed, 0, data_epochs)
        model.fit(batches, epochs=1 + timed, steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[*callbacks, timer])
        return timing(timer, p.batch_size)

    return run


def plain_runner(name: str, params, data: Data, v: Variant) -> Runner:
    """The same architecture compiled and fitted the way the Keras guides do, on numpy arrays."""
    import keras

    from pipeline.models import registry

    p = params.model(name)
    optimizer = {
        "sgd": lambda: keras.optimizers.SGD(p.learning_rate),
        "momentum": lambda: keras.optimizers.SGD(p.learning_rate, momentum=p.momentum),
        "rmsprop": lambda: keras.optimizers.RMSprop(p.learning_rate, rho=p.rho),
        "adam": lambda: keras.optimizers.Adam(p.learning_rate),
    }[p.optimizer]()
    mse = registry.REGISTRY[name].loss == "mse"
    model = registry.build(name, p)
    model.compile(
        optimizer=optimizer,
        loss="mean_squared_error" if mse else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy() if mse else keras.metrics.SparseCategoricalAccuracy()],
        steps_per_execution=v.spe or 1,
    )
    x_all = data.splits["train"].x.astype(np.float32)  # raw pixels 0..255: the model rescales them itself
    y_all = data.splits["train"].y.astype(np.int32)
    if mse:
        y_all = np.eye(10, dtype=np.float32)[y_all]  # least squares on one-hot targets

    def run(steps: int, timed: int) -> Timing:
        set_determinism(False)
        n = steps * p.batch_size
        timer = step_timer()
        model.fit(x_all[:n], y_all[:n], batch_size=p.batch_size, epochs=1 + timed, shuffle=True, verbose=0, callbacks=[timer])
        return timing(timer, p.batch_size)

    return run


def train_model_runner(name: str, params, data: Data, v: Variant, tmp: Path) -> Runner:
    """pipeline.train.loop.train_model itself, in a fresh scratch folder per call (it builds a new model each time)."""
    from pipeline.train.loop import train_model

    p = params.model(name)
    spe = params.train.steps_per_execution
    available = len(data.splits["train"].y) // p.batch_size
    calls = [0]

    def run(steps: int, timed: int) -> Timing:
        calls[0] += 1
        steps = min(max(spe, round(steps / spe) * spe), available // spe * spe)  # train_model wants spe | steps
        splits = {"train": subset(data.splits["train"], steps * p.batch_size), "val": data.splits["val"]}
        # float32 like the other variants: `precision: auto` (bf16 on an AVX512-BF16 CPU) would make
        # this ratio measure the arithmetic too, not the stage's validation, TensorBoard and checkpoints
        run_p = p.model_copy(update={"epochs": 1 + timed, "precision": "float32"})
        scratch = tmp / f"train_model-{name}-{calls[0]}"
        timer = step_timer()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch progress lines
                train_model(
                    name,
                    run_p,
                    params.seed,
                    params.train,
                    splits,
                    data.folder,
                    scratch / "resume",
                    scratch / "tensorboard",
                    callbacks=[timer],
                )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return timing(timer, p.batch_size)

    return run


def make_runner(name: str, params, data: Data, v: Variant, tmp: Path) -> Runner:
    if v.kind == "plain":
        return plain_runner(name, params, data, v)
    if v.kind == "train_model":
        return train_model_runner(name, params, data, v, tmp)
    return project_runner(name, params, data, v)


# --- measuring one model -------------------------------------------------------------------------


def sizes(rate: float, batch_size: int, available: int, target_s: float, unit: int) -> tuple[int, int]:
    """(steps per epoch, timed epochs) so that the timed epochs take about target_s at `rate` samples/s.

    Steps are a multiple of `unit` (whole executions of the candidate steps_per_execution), two units at least.
    """
    max_steps = available // batch_size // unit * unit
    wanted = rate * target_s / batch_size
    steps = min(max(2 * unit, round(wanted / unit) * unit), max_steps)
    timed = min(max(1, round(wanted / steps)), 5)
    return steps, timed


def measure(name: str, params, data: Data, variants: list[Variant], ctx: Context) -> dict:
    """Each variant's Timing per round, the variants alternating within a round."""
    p = params.model(name)
    # Calibrate (and trace) with the first variant on a few steps, then size the epochs to the target time.
    # Steps are whole executions of the candidate steps_per_execution (and of params.yaml's), two at least.
    unit = math.lcm(CANDIDATE_SPE[ctx.quick], params.train.steps_per_execution)
    if 2 * unit * p.batch_size > len(data.splits["train"].y):
        unit = CANDIDATE_SPE[ctx.quick]
    runners = {variants[0].label: make_runner(name, params, data, variants[0], ctx.tmp)}
    calibration = runners[variants[0].label](2 * unit, 1)
    steps, timed = sizes(calibration.steady, p.batch_size, len(data.splits["train"].y), TARGET_S[ctx.quick], unit)
    variants = [v for v in variants if not (v.spe in SEARCH_SPE and 2 * v.spe > steps)]
    runners.update({v.label: make_runner(name, params, data, v, ctx.tmp) for v in variants[1:]})
    rounds: dict[str, list[Timing]] = {v.label: [] for v in variants}
    for _ in range(ROUNDS[ctx.quick]):
        for v in variants:
            rounds[v.label].append(runners[v.label](steps, timed))
    best = {label: Timing(max(t.steady for t in ts), min(t.epoch_overhead_s for t in ts)) for label, ts in rounds.items()}
    return {
        "steps_per_epoch": steps,
        "timed_epochs": timed,
        "samples_per_epoch": steps * p.batch_size,
        "batch_size": p.batch_size,
        "full_epoch_samples": len(data.splits["train"].y),
        "rounds": rounds,
        "best": best,
    }


def variants_for(name: str, params, quick: bool) -> list[Variant]:
    """The variants measured for `name`: the comparison for every model, plus the search for a few."""
    spe = CANDIDATE_SPE[quick]
    vs = [
        Variant("project", "project"),
        Variant("plain", "plain"),
        Variant(f"project spe={spe}", "project", spe=spe),
        Variant("train_model", "train_model"),
    ]
    if name in SEARCH_MODELS and not quick:
        vs += [
            Variant(f"project spe={s}", "project", spe=s) for s in SEARCH_SPE if s not in (spe, params.train.steps_per_execution)
        ]
        vs += [
            Variant("project no NaNGuard", "project", nan_guard=False),
            Variant("project no determinism", "project", deterministic=False),
            Variant("project tf.data autotuned", "project", autotune=True),
            Variant(f"plain spe={spe}", "plain", spe=spe),
        ]
    return vs


# --- thread settings: child processes -------------------------------------------------------------


def child_main(job: dict) -> None:
    """In a fresh process: set TF's threads, then measure one project variant; print the Timings as JSON."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(job["intra"])
    tf.config.threading.set_inter_op_parallelism_threads(job["inter"])
    tf.get_logger().setLevel("ERROR")
    from pipeline.artifacts import load_prepared
    from pipeline.config import load_params
    from pipeline.models.registry import PARAM_TYPES

    params = load_params(REPO / "params.yaml", model_types=PARAM_TYPES)
    folder = Path(job["data"])
    data = Data(load_prepared(folder), folder, "")
    runner = project_runner(job["model"], params, data, Variant("project", "project", spe=job["spe"]))
    runner(job["steps"], 1)  # trace and warm up
    print(json.dumps([asdict(runner(job["steps"], job["timed"])) for _ in range(job["rounds"])]))


def thread_settings(name: str, spe: int, result: dict, data: Data) -> dict[str, Timing]:
    """The project loop (spe) per (intra, inter) thread setting, one child process each, best of 2 rounds."""
    out = {}
    for intra, inter in THREADS:
        job = {
            "model": name,
            "spe": spe,
            "intra": intra,
            "inter": inter,
            "data": str(data.folder),
            "steps": result["steps_per_epoch"],
            "timed": result["timed_epochs"],
            "rounds": 2,
        }
        done = subprocess.run(
            [PYTHON, "-m", "benchmarks.throughput", "--child", json.dumps(job)],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        key = f"intra={intra or 'default'} inter={inter or 'default'}"
        try:
            ts = [Timing(**t) for t in json.loads(done.stdout.strip().splitlines()[-1])]
            out[key] = Timing(max(t.steady for t in ts), min(t.epoch_overhead_s for t in ts))
        except (ValueError, IndexError, KeyError, TypeError):
            print(f"[throughput] thread child {key} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
    return out


# --- the benchmark ----------------------------------------------------------------------------


def model_rows(name: str, params, result: dict, quick: bool) -> list[Row]:
    """The table rows of one model: the project loop and plain fit, and the ratios that matter."""
    best: dict[str, Timing] = result["best"]
    n, bs = result["full_epoch_samples"], result["batch_size"]
    full = {label: t.full_epoch(n, bs) for label, t in best.items()}
    steady = {label: t.steady for label, t in best.items()}
    spe = CANDIDATE_SPE[quick]
    top = max((label for label in full if label.startswith("project")), key=full.get)
    per_round = [
        a.full_epoch(n, bs) / b.full_epoch(n, bs) for a, b in zip(result["rounds"]["project"], result["rounds"]["plain"])
    ]
    size = f"{result['samples_per_epoch']:,} samples x {result['timed_epochs']} timed epoch(s), bs {bs}, best of {len(per_round)}"
    epoch = f"a {n:,}-image epoch"

    def ratio_note(a: str, b: str) -> str:
        return f"steady {steady[a] / steady[b]:.2f}; {steady[a]:,.0f} samples/s, epoch overhead {best[a].epoch_overhead_s:+.2f} s"

    rows = [
        Row(
            "throughput",
            f"{name}: project loop",
            steady["project"],
            "samples/s",
            f"steady; epoch overhead {best['project'].epoch_overhead_s:+.2f} s; spe={params.train.steps_per_execution}; {size}",
        ),
        Row(
            "throughput",
            f"{name}: plain Keras fit",
            steady["plain"],
            "samples/s",
            f"steady; epoch overhead {best['plain'].epoch_overhead_s:+.2f} s (a new tf.data iterator each epoch)",
        ),
        Row(
            "throughput",
            f"{name}: project / plain",
            full["project"] / full["plain"],
            "ratio",
            f"over {epoch}; steady {steady['project'] / steady['plain']:.2f}; rounds "
            + ", ".join(f"{r:.2f}" for r in per_round)
            + f"; best project setting: {top} ({full[top] / full['plain']:.2f})",
        ),
        Row(
            "throughput",
            f"{name}: project spe={spe} / plain",
            full[f"project spe={spe}"] / full["plain"],
            "ratio",
            f"over {epoch}; " + ratio_note(f"project spe={spe}", "plain"),
        ),
        Row(
            "throughput",
            f"{name}: train_model / plain",
            full["train_model"] / full["plain"],
            "ratio",
            f"over {epoch}; " + ratio_note("train_model", "plain") + " (validation, TensorBoard, checkpoint)",
        ),
    ]
    for label in best:
        if label not in ("project", "plain", "train_model", f"project spe={spe}"):
            base = "plain" if label.startswith("plain") else "project"
            rows.append(
                Row(
                    "throughput",
                    f"{name}: {label} / {base}",
                    full[label] / full[base],
                    "ratio",
                    f"over {epoch}, settings search; " + ratio_note(label, base),
                )
            )
    threads = result.get("threads", {})
    if len(threads) > 1:
        default, *others = threads
        for key in others:
            rows.append(
                Row(
                    "throughput",
                    f"{name}: threads {key} / default",
                    threads[key].full_epoch(n, bs) / threads[default].full_epoch(n, bs),
                    "ratio",
                    f"over {epoch}; project spe={spe}, separate processes one after the other; "
                    f"steady {threads[key].steady:,.0f} vs {threads[default].steady:,.0f} samples/s",
                )
            )
    result["best_project_variant"] = top
    return rows


def models_to_measure(params, quick: bool) -> list[str]:
    return [m for m in params.models if m in SEARCH_MODELS] if quick else list(params.models)


def run(ctx: Context) -> list[Row]:
    import keras

    from pipeline.config import load_params
    from pipeline.models.registry import PARAM_TYPES

    params = load_params(REPO / "params.yaml", model_types=PARAM_TYPES)
    data = load_data(ctx)
    rows: list[Row] = []
    results: dict[str, dict] = {}
    for name in models_to_measure(params, ctx.quick):
        started = time.perf_counter()
        try:
            result = measure(name, params, data, variants_for(name, params, ctx.quick), ctx)
            if name in SEARCH_MODELS and not ctx.quick:
                result["threads"] = thread_settings(name, CANDIDATE_SPE[ctx.quick], result, data)
            rows += model_rows(name, params, result, ctx.quick)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the others' figures
            rows.append(Row("throughput", name, None, "", f"error: {type(exc).__name__}: {exc}"[:300]))
            continue
        finally:
            keras.backend.clear_session()  # the measured models go before the next model's are built
        result["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = result
        b = result["best"]
        print(
            f"[throughput] {name}: steady project {b['project'].steady:,.0f}/s, plain {b['plain'].steady:,.0f}/s; "
            f"best project setting {result['best_project_variant']} ({result['seconds']} s)",
            file=sys.stderr,
            flush=True,
        )
    set_determinism(False)
    ctx.shared["throughput"] = results
    ctx.details["throughput"] = {
        "data": data.source,
        "params_steps_per_execution": params.train.steps_per_execution,
        "params_deterministic": params.train.deterministic,
        "models": {name: json.loads(json.dumps(r, default=asdict)) for name, r in results.items()},
    }
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, help="a JSON job (used by thread_settings)")
    child_main(json.loads(parser.parse_args().child))
