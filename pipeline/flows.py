"""Prefect flows: one per DVC stage. Each wraps the stage's plain functions as tasks.

DVC runs `stages/<stage>.py`, which calls `run_stage` with one of these flows, so every
`dvc repro` shows each stage on the Prefect dashboard. The flows add orchestration
(tasks, retries, logs, artifacts) and no logic of their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from pipeline import evaluate, export, fetch, preprocess, report, train
from pipeline.config import Params
from pipeline.data import MNIST_FILES, atomic_write, load_prepared, remove_leftovers, save_prepared

TENSORBOARD_URL = "http://127.0.0.1:6006"


def _task(fn, **options):
    """A Prefect task around a plain function. Inputs are arrays and models: never cache or hash them."""
    return task(fn, cache_policy=NO_CACHE, **options)


@flow(name="fetch")
def fetch_flow(params: Params, out: Path, tensorboard: Path) -> None:
    """Fetch the four MNIST files from the first mirror that serves each one verified."""
    logger = get_run_logger()
    mirrors = fetch.mirrors_to_try(params.fetch)
    logger.info("mirrors, in order: %s", ", ".join(mirrors))
    pool = fetch.http_pool(params.fetch)
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    fetch_file = _task(
        fetch.fetch_file,
        retries=params.fetch.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=params.fetch.backoff_s) if params.fetch.backoff_s else 0,
    )
    fetched = [fetch_file.with_options(task_run_name=f"fetch {name}")(name, mirrors, out, pool) for name in MNIST_FILES]
    _task(fetch.write_summaries, task_run_name="tensorboard")(fetched, tensorboard)


@flow(name="preprocess")
def preprocess_flow(params: Params, raw: Path, out: Path, report: Path, tensorboard: Path) -> None:
    """Check the raw files, split off the validation set, write the arrays and the data report."""
    logger = get_run_logger()
    raw_splits = _task(preprocess.load_raw, task_run_name="read IDX")(raw)
    train, val = _task(preprocess.split_validation, task_run_name="split validation")(
        raw_splits["train"], params.data, params.seed
    )
    splits = {"train": train, "val": val, "test": raw_splits["test"]}
    data_report = _task(preprocess.data_report, task_run_name="check and report")(splits)
    logger.info(
        "train %d, val %d, test %d images; %d test images also in train",
        len(train.y), len(val.y), len(splits["test"].y), data_report["test_images_duplicated_in_train"],
    )
    _task(save_prepared, task_run_name="write arrays")(out, splits)
    atomic_write(report, (json.dumps(data_report, indent=2) + "\n").encode())
    _task(preprocess.write_summaries, task_run_name="tensorboard")(splits, data_report, tensorboard)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "-".join(parts).lower().replace("_", "-")


class PrefectProgress(keras.callbacks.Callback):
    """A Prefect progress artifact, updated after every epoch."""

    def __init__(self, name: str, epochs: int):
        super().__init__()
        self.name, self.epochs, self.artifact_id = name, epochs, None

    def on_train_begin(self, logs: dict | None = None) -> None:
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = create_progress_artifact(
            0.0, key=artifact_key("train-progress", self.name), description=f"epochs of {self.name} done"
        )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from prefect.artifacts import update_progress_artifact

        logs = logs or {}
        update_progress_artifact(
            self.artifact_id,
            100.0 * (epoch + 1) / self.epochs,
            description=f"{self.name}: epoch {epoch + 1}/{self.epochs}, val_accuracy {logs.get('val_accuracy', float('nan')):.4f}",
        )


@flow(name="train")
def train_flow(params: Params, model: str, data: Path, out: Path, resume: Path, tensorboard: Path) -> None:
    """Train one registry model, resuming from its last completed epoch if it was interrupted."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    p = params.model(model)
    splits = _task(load_prepared, task_run_name="load data")(data)
    result = _task(train.train_model, task_run_name=f"fit {model}")(
        model, params, splits, data, resume, tensorboard, callbacks=[PrefectProgress(model, p.epochs)]
    )
    _task(train.save_outputs, task_run_name="save model")(result, model, p, params, out)
    shutil.rmtree(resume, ignore_errors=True)  # the outputs are complete: nothing left to resume
    meta = train.load_meta(out)
    create_markdown_artifact(
        f"### {model}: training\n\n{train.models.REGISTRY[model].description}\n\n"
        f"| epochs | parameters | val_accuracy | seconds |\n|---|---|---|---|\n"
        f"| {meta['epochs']} | {meta['parameters']:,} | {meta['val_accuracy']:.4f} | {meta['train_seconds']} |\n",
        key=artifact_key("train", model),
        description=f"training summary of {model}",
    )
    create_link_artifact(
        f"{TENSORBOARD_URL}/#timeseries&runFilter=train/{model}",
        link_text=f"TensorBoard: train/{model}",
        key=artifact_key("tensorboard", model),
    )


@flow(name="evaluate")
def evaluate_flow(params: Params, model: str, model_dir: Path, data: Path, out: Path, tensorboard: Path) -> None:
    """Score one trained model on the test set, decide its gate, write metrics, plots and summaries."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    keras_model, meta = _task(evaluate.load_for_evaluation, task_run_name="load model")(model_dir)
    test = _task(load_prepared, task_run_name="load data")(data)["test"]
    ev = _task(evaluate.evaluate_model, task_run_name="predict test set")(
        keras_model, meta, test, params.gates[model], params.evaluate.batch_size
    )
    _task(evaluate.write_outputs, task_run_name="write metrics")(ev, test, out)
    _task(evaluate.write_pictures, task_run_name="draw pictures")(ev, model_dir / train.HISTORY_FILE, model, out)
    shutil.rmtree(tensorboard, ignore_errors=True)
    _task(evaluate.write_summaries, task_run_name="tensorboard")(
        keras_model, ev, test, model, tensorboard, params.evaluate.misclassified_grid, params.evaluate.embedding_sample
    )
    m = ev.metrics
    verdict = "passes" if m["blessed"] else "is UNDER"
    logger.info("%s: test accuracy %.4f %s its gate %.4f", model, m["accuracy"], verdict, m["gate"])
    create_markdown_artifact(
        f"### {model}: test metrics\n\n| metric | value |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in m.items())
        + "\n",
        key=artifact_key("metrics", model),
        description=f"test metrics of {model}",
    )


@flow(name="export")
def export_flow(params: Params, model: str, model_dir: Path, evaluation: Path, data: Path, out: Path, tensorboard: Path) -> None:
    """Export a blessed model as a verified SavedModel version; record why an unblessed one is not."""
    import tensorflow as tf

    from pipeline import summaries

    logger = get_run_logger()
    metrics = json.loads((evaluation / evaluate.METRICS_FILE).read_text())
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    shutil.rmtree(tensorboard, ignore_errors=True)
    if not metrics["blessed"]:
        reason = (
            f"model {model} is not exported: its test accuracy {metrics['accuracy']:.4f} is under its gate "
            f"{metrics['gate']:.4f} (params.yaml gates.{model})"
        )
        logger.warning(reason)
        export.write_record(out, {"model": model, "blessed": False, "reason": reason, "accuracy": metrics["accuracy"], "gate": metrics["gate"]})
        with summaries.writer(tensorboard).as_default():
            tf.summary.text("export/status", reason, step=0)
        return
    version = export.next_version(out)
    staging = out / f".tmp-{version}"
    keras_model = _task(train.load_trained, task_run_name="load model")(model_dir)
    _task(export.save_servable, task_run_name="write SavedModel")(keras_model, staging)
    check = _task(export.verify_in_fresh_process, task_run_name="verify in fresh process")(
        staging, data, evaluation / evaluate.PREDICTIONS_FILE, params.export.latency_repeats
    )
    staging.rename(out / str(version))  # published only now, complete and verified
    size = export.folder_bytes(out / str(version))
    record = {"model": model, "blessed": True, "version": version, "path": str(out / str(version)), "bytes": size, **check}
    export.write_record(out, record)
    logger.info(
        "%s exported as version %d (%.1f MB); fresh-process check: %d test predictions identical; latency %.2f ms (batch 1), %.2f ms (batch 256)",
        model, version, size / 1e6, check["test_images"], check["latency_ms_batch_1"], check["latency_ms_batch_256"],
    )
    with summaries.writer(tensorboard).as_default():
        tf.summary.text("export/signature", export.describe_signature(out / str(version)), step=0)
        tf.summary.scalar("export/size_bytes", size, step=0)
        tf.summary.scalar("export/latency_ms_batch_1", check["latency_ms_batch_1"], step=0)
        tf.summary.scalar("export/latency_ms_batch_256", check["latency_ms_batch_256"], step=0)


@flow(name="report")
def report_flow(params: Params, evaluations: Path, data_report: Path, leaderboard: Path, out: Path, tensorboard: Path) -> None:
    """The leaderboard of all models: metrics file, markdown report, Prefect table, TensorBoard HParams."""
    from prefect.artifacts import create_table_artifact

    rows = report.read_metrics(evaluations, list(params.models))
    _task(report.write_outputs, task_run_name="write leaderboard")(
        rows, json.loads(data_report.read_text()), params, leaderboard, out
    )
    shutil.rmtree(tensorboard, ignore_errors=True)
    _task(report.write_hparams, task_run_name="tensorboard hparams")(rows, params, tensorboard)
    create_table_artifact(
        [{title: report._cell(key, r[key]) for key, title in report.COLUMNS} for r in rows],
        key="leaderboard",
        description="test accuracy of every model, best first",
    )
    for r in rows:
        get_run_logger().info("%-10s %.4f %s", r["model"], r["accuracy"], "" if r["blessed"] else "(under its gate)")
