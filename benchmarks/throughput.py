"""Benchmark 1: training throughput per model, the project's train code vs a plain Keras `fit`.

Every variant trains the same architecture (pipeline.models.build with params.yaml's block),
at the same batch size, on the same images (data/prepared/mnist.npz if present, else
synthetic), in this one process, alternating A, B, C, A, B, C ... Each measurement is one
`fit` call of 1 + k epochs; the first epoch (tracing, iterator start) is not timed, the k
others are: samples/s = samples of the timed epochs / their seconds (EpochTimer, run last).

    project      pipeline.train.compile_model + fit(pipeline.train.training_batches(...),
                 steps_per_epoch=...) with the project's cheap callbacks (EpochSeeds, NaNGuard,
                 EpochLog), TF op determinism as params.yaml says, no validation: the training loop
    plain        what a user writes: model.compile(<same optimizer>, <same loss>, metrics) and
                 model.fit(x_float32, y, batch_size=bs, epochs=..., shuffle=True), no determinism
    train_model  pipeline.train.train_model itself: validation, TensorBoard (histograms),
                 DeadReLU, a checkpoint after every epoch, all included

The settings search (full run, models in SEARCH_MODELS) adds variants of the project's loop:
other steps_per_execution, no per-batch NaNGuard, no op determinism, and thread settings in
child processes (threads can only be set before TensorFlow starts).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from benchmarks.common import PYTHON, REPO, Context, Row, child_env, median

CANDIDATE_SPE = {False: 32, True: 8}  # steps_per_execution tried for every model (full, quick)
SEARCH_MODELS = ("logreg", "cnn")  # the settings search: a small model and the CNN
SEARCH_SPE = (8, 128)
THREADS = ((0, 0), (2, 1), (1, 1))  # (intra-op, inter-op) threads per child; 0 = TensorFlow's default
TARGET_S = {False: 1.5, True: 0.15}  # timed seconds per measurement (full, quick)
ROUNDS = {False: 2, True: 1}
ALIGN = 8  # measured epochs have a multiple of this many steps (and of params' steps_per_execution) where the data allows

Runner = Callable[[int, int], float]  # (steps per epoch, timed epochs) -> samples/s


@dataclass(frozen=True)
class Variant:
    """One way of training a model; None means: as params.yaml says."""

    label: str
    kind: Literal["project", "plain", "train_model"]
    spe: int | None = None
    nan_guard: bool = True
    deterministic: bool | None = None


# --- data ------------------------------------------------------------------------------------


@dataclass
class Data:
    splits: dict  # name -> pipeline.data.Split
    folder: Path  # holds mnist.npz (train_model's fingerprint reads it)
    source: str


def load_data(ctx: Context) -> Data:
    """The prepared MNIST arrays if the pipeline made them, else synthetic ones of the same shapes."""
    from pipeline.data import PREPARED_FILE, Split, load_prepared, save_prepared

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


# --- timing -----------------------------------------------------------------------------------


def epoch_timer():
    """A Keras callback recording each epoch's seconds (pass it last: it then times the others' epoch work)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self.start = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    return EpochTimer()


def set_determinism(on: bool) -> None:
    """Switch TF op determinism on or off for what runs next (project: as params.yaml; plain: off)."""
    from tensorflow.python.framework import config

    config.enable_op_determinism() if on else config.disable_op_determinism()


# --- the variants -----------------------------------------------------------------------------


def project_runner(name: str, params, data: Data, v: Variant) -> Runner:
    """compile_model + fit(training_batches) with EpochSeeds, NaNGuard (unless switched off), EpochLog."""
    from pipeline import train

    p = params.model(name)
    spe = v.spe or params.train.steps_per_execution
    deterministic = params.train.deterministic if v.deterministic is None else v.deterministic
    model = train.compile_model(name, p, 430, params.train.model_copy(update={"steps_per_execution": spe}))

    def run(steps: int, timed: int) -> float:
        set_determinism(deterministic)
        timer = epoch_timer()
        callbacks = [train.EpochSeeds(params.seed), train.EpochLog(name, 1 + timed)]
        if v.nan_guard:
            callbacks.append(train.NaNGuard(name, p.learning_rate))
        # When steps_per_execution does not divide steps, Keras's last execution of an epoch
        # takes batches of the next one: each Keras epoch runs whole executions, and the data
        # holds enough epochs for all of them.
        per_epoch = math.ceil(steps / spe) * spe
        data_epochs = math.ceil((1 + timed) * per_epoch / steps)
        batches = train.training_batches(subset(data.splits["train"], steps * p.batch_size), p.batch_size, params.seed, 0, data_epochs)
        model.fit(batches, epochs=1 + timed, steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[*callbacks, timer])
        return per_epoch * p.batch_size * timed / sum(timer.seconds[1:])

    return run


def plain_runner(name: str, params, data: Data, v: Variant) -> Runner:
    """The same architecture compiled and fitted the way the Keras guides do, on numpy arrays."""
    import keras

    from pipeline import models

    p = params.model(name)
    optimizer = {
        "sgd": lambda: keras.optimizers.SGD(p.learning_rate),
        "momentum": lambda: keras.optimizers.SGD(p.learning_rate, momentum=p.momentum),
        "rmsprop": lambda: keras.optimizers.RMSprop(p.learning_rate, rho=p.momentum),
        "adam": lambda: keras.optimizers.Adam(p.learning_rate),
    }[p.optimizer]()
    mse = models.REGISTRY[name].loss == "mse"
    model = models.build(name, p)
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

    def run(steps: int, timed: int) -> float:
        set_determinism(False)
        n = steps * p.batch_size
        timer = epoch_timer()
        model.fit(x_all[:n], y_all[:n], batch_size=p.batch_size, epochs=1 + timed, shuffle=True, verbose=0, callbacks=[timer])
        return n * timed / sum(timer.seconds[1:])

    return run


def train_model_runner(name: str, params, data: Data, v: Variant, tmp: Path) -> Runner:
    """pipeline.train.train_model itself, in a fresh scratch folder per call (it builds a new model each time)."""
    from pipeline import train
    from pipeline.data import Split

    p = params.model(name)
    calls = [0]

    def run(steps: int, timed: int) -> float:
        calls[0] += 1
        n = steps * p.batch_size
        n_val = max(200, round(len(data.splits["val"].y) * n / len(data.splits["train"].y)))  # the pipeline's val/train ratio
        splits = {"train": subset(data.splits["train"], n), "val": subset(data.splits["val"], n_val)}
        block = {**params.models[name], "epochs": 1 + timed}
        run_params = params.model_copy(update={"models": {**params.models, name: block}})
        scratch = tmp / f"train_model-{name}-{calls[0]}"
        timer = epoch_timer()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch progress lines
                train.train_model(name, run_params, splits, data.folder, scratch / "resume", scratch / "tensorboard", callbacks=[timer])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return n * timed / sum(timer.seconds[1:])

    return run


def make_runner(name: str, params, data: Data, v: Variant, tmp: Path) -> Runner:
    if v.kind == "plain":
        return plain_runner(name, params, data, v)
    if v.kind == "train_model":
        return train_model_runner(name, params, data, v, tmp)
    return project_runner(name, params, data, v)


# --- measuring one model -------------------------------------------------------------------------


def sizes(rate: float, batch_size: int, available: int, target_s: float, align: int) -> tuple[int, int]:
    """(steps per epoch, timed epochs) so that the timed epochs take about target_s at `rate` samples/s."""
    max_steps = available // batch_size
    align = align if align <= max_steps else 1
    wanted = rate * target_s / batch_size
    steps = min(max(align, round(wanted / align) * align), max_steps // align * align)
    timed = min(max(1, round(wanted / steps)), 5)
    return steps, timed


def measure(name: str, params, data: Data, variants: list[Variant], ctx: Context) -> dict:
    """Samples/s of each variant over the rounds, alternating variants within a round."""
    p = params.model(name)
    align = math.lcm(ALIGN, params.train.steps_per_execution)  # train_model needs whole executions per epoch
    # Calibrate (and trace) with the first variant on a few steps, then size the epochs to the target time.
    runners = {variants[0].label: make_runner(name, params, data, variants[0], ctx.tmp)}
    calibration = runners[variants[0].label](align if ctx.quick else max(16, align), 1)
    steps, timed = sizes(calibration, p.batch_size, len(data.splits["train"].y), TARGET_S[ctx.quick], align)
    # A searched steps_per_execution above the steps of an epoch would only stretch the epoch.
    variants = [v for v in variants if not (v.spe in SEARCH_SPE and v.spe > steps)]
    runners.update({v.label: make_runner(name, params, data, v, ctx.tmp) for v in variants[1:]})
    spe_used = {v.spe or params.train.steps_per_execution for v in variants}
    rates: dict[str, list[float]] = {v.label: [] for v in variants}
    for _ in range(ROUNDS[ctx.quick]):
        for v in variants:
            rates[v.label].append(runners[v.label](steps, timed))
    return {
        "steps_per_epoch": steps,
        "timed_epochs": timed,
        "samples_per_epoch": steps * p.batch_size,
        "batch_size": p.batch_size,
        "steps_per_execution_used": sorted(spe_used),
        "rates": rates,
    }


def variants_for(name: str, params, quick: bool) -> list[Variant]:
    """The variants measured for `name`: the comparison for every model, plus the search for a few."""
    spe = CANDIDATE_SPE[quick]
    params_spe = params.train.steps_per_execution
    vs = [
        Variant("project", "project"),
        Variant("plain", "plain"),
        Variant(f"project spe={spe}", "project", spe=spe),
        Variant("train_model", "train_model"),
    ]
    if name in SEARCH_MODELS and not quick:
        vs += [Variant(f"project spe={s}", "project", spe=s) for s in SEARCH_SPE if s not in (spe, params_spe)]
        vs += [
            Variant("project no NaNGuard", "project", nan_guard=False),
            Variant("project no determinism", "project", deterministic=False),
            Variant(f"plain spe={spe}", "plain", spe=spe),
        ]
    return vs


# --- thread settings: child processes -------------------------------------------------------------


def child_main(job: dict) -> None:
    """In a fresh process: set TF's threads, then measure one project variant; print the rates as JSON."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(job["intra"])
    tf.config.threading.set_inter_op_parallelism_threads(job["inter"])
    from pipeline.config import load_params
    from pipeline.data import load_prepared

    params = load_params(REPO / "params.yaml")
    folder = Path(job["data"])
    data = Data(load_prepared(folder), folder, "")
    runner = project_runner(job["model"], params, data, Variant("project", "project", spe=job["spe"]))
    runner(job["steps"], 1)  # trace and warm up
    rates = [runner(job["steps"], job["timed"]) for _ in range(job["rounds"])]
    print(json.dumps({"rates": rates}))


def thread_settings(name: str, spe: int, result: dict, data: Data) -> dict[str, float]:
    """Median samples/s of the project loop (spe) per (intra, inter) thread setting, one child process each."""
    out = {}
    for intra, inter in THREADS:
        job = {
            "model": name, "spe": spe, "intra": intra, "inter": inter, "data": str(data.folder),
            "steps": result["steps_per_epoch"], "timed": result["timed_epochs"], "rounds": 2,
        }
        done = subprocess.run(
            [PYTHON, "-m", "benchmarks.throughput", "--child", json.dumps(job)],
            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
        )
        key = f"intra={intra or 'default'} inter={inter or 'default'}"
        try:
            out[key] = median(json.loads(done.stdout.strip().splitlines()[-1])["rates"])
        except (ValueError, IndexError, KeyError):
            out[key] = float("nan")
            print(f"[throughput] thread child {key} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
    return out


# --- the benchmark ----------------------------------------------------------------------------


def models_to_measure(params, quick: bool) -> list[str]:
    return [m for m in params.models if m in SEARCH_MODELS] if quick else list(params.models)


def run(ctx: Context) -> list[Row]:
    import keras

    from pipeline.config import load_params

    params = load_params(REPO / "params.yaml")
    data = load_data(ctx)
    rows: list[Row] = []
    details: dict = {"data": data.source, "params_steps_per_execution": params.train.steps_per_execution,
                     "params_deterministic": params.train.deterministic, "models": {}}
    spe = CANDIDATE_SPE[ctx.quick]
    for name in models_to_measure(params, ctx.quick):
        started = time.perf_counter()
        try:
            result = measure(name, params, data, variants_for(name, params, ctx.quick), ctx)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the others' figures
            rows.append(Row("throughput", name, None, "", f"error: {type(exc).__name__}: {exc}"[:300]))
            continue
        med = {label: median(r) for label, r in result["rates"].items()}
        best = max((label for label in med if label.startswith("project")), key=med.get)
        rounds = [a / b for a, b in zip(result["rates"]["project"], result["rates"]["plain"])]
        size = f"{result['samples_per_epoch']:,} samples x {result['timed_epochs']} timed epoch(s), bs {result['batch_size']}"
        n_rounds = len(rounds)
        rows += [
            Row("throughput", f"{name}: project loop", med["project"], "samples/s",
                f"spe={params.train.steps_per_execution}, median of {n_rounds}; {size}"),
            Row("throughput", f"{name}: plain Keras fit", med["plain"], "samples/s", f"numpy float32, shuffle=True; median of {n_rounds}"),
            Row("throughput", f"{name}: project / plain", med["project"] / med["plain"], "ratio",
                "rounds " + ", ".join(f"{r:.2f}" for r in rounds) + f"; best project setting: {best} ({med[best] / med['plain']:.2f})"),
            Row("throughput", f"{name}: project spe={spe} / plain", med[f"project spe={spe}"] / med["plain"], "ratio",
                f"{med[f'project spe={spe}']:,.0f} samples/s"),
            Row("throughput", f"{name}: train_model / plain", med["train_model"] / med["plain"], "ratio",
                f"{med['train_model']:,.0f} samples/s; with validation, TensorBoard, checkpoint per epoch"),
        ]
        for label in med:
            if label not in ("project", "plain", "train_model", f"project spe={spe}"):
                base = "plain" if label.startswith("plain") else "project"
                rows.append(Row("throughput", f"{name}: {label} / {base}", med[label] / med[base], "ratio",
                                f"{med[label]:,.0f} samples/s (settings search)"))
        if name in SEARCH_MODELS and not ctx.quick:
            threads = thread_settings(name, spe, result, data)
            result["threads_spe"] = spe
            result["threads"] = threads
            base = threads[next(iter(threads))]
            for key, rate in list(threads.items())[1:]:
                rows.append(Row("throughput", f"{name}: threads {key} / default", rate / base, "ratio",
                                f"project spe={spe}, {rate:,.0f} vs {base:,.0f} samples/s, separate processes"))
        result.update(median=med, best_project_variant=best, seconds=round(time.perf_counter() - started, 1))
        details["models"][name] = result
        keras.backend.clear_session()  # the measured models go before the next model's are built
        print(f"[throughput] {name}: project {med['project']:,.0f}/s, plain {med['plain']:,.0f}/s, "
              f"best {best} {med[best]:,.0f}/s ({result['seconds']} s)", file=sys.stderr, flush=True)
    set_determinism(False)
    ctx.details["throughput"] = details
    ctx.shared["throughput"] = details["models"]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, help="a JSON job (used by thread_settings)")
    child_main(json.loads(parser.parse_args().child))
