"""The leaderboard of all models: a DVC metrics file, data/report.md, and TensorBoard's HParams view."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from pipeline import artifacts, tables
from pipeline.config import ModelParams

COLUMNS = [
    ("model", "model"),
    ("accuracy", "test accuracy"),
    ("gate", "gate"),
    ("blessed", "gate passed"),
    ("loss", "test loss"),
    ("macro_f1", "macro F1"),
    ("parameters", "parameters"),
    ("epochs", "epochs"),
    ("train_seconds", "training s"),
    ("eval_images_per_s", "eval images/s"),
]


LEADERBOARD_KEYS = ("accuracy",)  # the rest of each model's metrics is in its own metrics.json


def read_rows(models_dir: Path, evaluate_dir: Path, models: list[str]) -> list[dict]:
    """One row per model, best test accuracy first: its metrics.json and macro precision, recall and F1
    (per_class.csv), with its size, epochs and validation accuracy (meta.json) and its timings (the
    train and evaluate stages' timings.json)."""
    rows = []
    for name in models:
        meta, per_class = artifacts.read_meta(models_dir / name), artifacts.read_per_class(evaluate_dir / name)
        rows.append(
            {
                "model": name,
                **artifacts.read_metrics(evaluate_dir / name),
                "macro_precision": float(per_class["precision"].mean()),
                "macro_recall": float(per_class["recall"].mean()),
                "macro_f1": float(per_class["f1"].mean()),
                "parameters": meta["parameters"],
                "epochs": meta["epochs"],
                "val_accuracy": meta["val_accuracy"],
                **artifacts.read_timings(models_dir / name, "train"),
                **artifacts.read_timings(evaluate_dir / name, "evaluate"),
            }
        )
    return sorted(rows, key=lambda r: -r["accuracy"])


def leaderboard_json(rows: list[dict]) -> dict:
    """The leaderboard as DVC metrics, kept in git: each model's test accuracy, best first, so that
    `dvc metrics show` on a fresh clone shows them before any `dvc pull` (as `accuracy.cnn`, ...)."""
    return {key: {r["model"]: r[key] for r in rows} for key in LEADERBOARD_KEYS}


def cell(key: str, value) -> str:
    """A leaderboard value as the report shows it."""
    if key in ("accuracy", "gate"):
        return f"{100 * value:.2f}%"
    if key == "blessed":
        return "yes" if value else "**no**"
    if key in ("parameters", "eval_images_per_s"):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def leaderboard_table(rows: list[dict]) -> list[dict[str, str]]:
    """The leaderboard as the report shows it: one dict per model, column title -> cell."""
    return [{title: cell(key, r[key]) for key, title in COLUMNS} for r in rows]


def report_markdown(rows: list[dict], data_report: dict, seed: int) -> str:
    """data/report.md: the leaderboard, then each model's confusion matrix and training curves."""
    lines = [
        "# MNIST pipeline report",
        "",
        f"Test accuracy on the {data_report['splits']['test']['images']:,} MNIST test images, best first. A model passes its gate",
        "(params.yaml `gates`) when its test accuracy is at least the gate; only those are exported.",
        f"Training: {data_report['splits']['train']['images']:,} images, validation {data_report['splits']['val']['images']:,};",
        f"random seed {seed}; TensorFlow {tf.__version__}; {platform.machine()}, {_cpu_name()}.",
        "",
        tables.markdown([title for _, title in COLUMNS], [list(row.values()) for row in leaderboard_table(rows)]),
    ]
    for r in rows:
        name = r["model"]
        lines += [
            "",
            f"## {name}",
            "",
            f"Test accuracy {100 * r['accuracy']:.2f}% (gate {100 * r['gate']:.2f}%: {'passed' if r['blessed'] else 'NOT passed, not exported'}),"
            f" macro precision {r['macro_precision']:.4f}, recall {r['macro_recall']:.4f}, F1 {r['macro_f1']:.4f}.",
            "",
            f"![{name} training curves](evaluate/{name}/{artifacts.CURVES_FILE})",
            f"![{name} confusion matrix](evaluate/{name}/{artifacts.CONFUSION_FILE})",
        ]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def dropout(p: ModelParams) -> float:
    """The model's largest drop rate (0 for models without dropout)."""
    knobs = p.model_dump()
    return max([float(v) for k, v in knobs.items() if k.endswith("_drop") or k == "dropout"] or [0.0])


def write_hparams(rows: list[dict], models: dict[str, ModelParams], logdir: Path) -> None:
    """TensorBoard HParams: one session per model with its hyper-parameters and final metrics (a fresh run folder)."""
    shutil.rmtree(logdir, ignore_errors=True)
    names = [r["model"] for r in rows]
    h_model = hp.HParam("model", hp.Discrete(sorted(names)))
    h_opt = hp.HParam("optimizer", hp.Discrete(["sgd", "momentum", "rmsprop", "adam"]))
    h_lr = hp.HParam("learning_rate", hp.RealInterval(0.0, 10.0))
    h_bs = hp.HParam("batch_size", hp.IntInterval(1, 1 << 20))
    h_ep = hp.HParam("epochs", hp.IntInterval(1, 1 << 20))
    h_drop = hp.HParam("dropout", hp.RealInterval(0.0, 1.0))
    h_params = hp.HParam("parameters", hp.IntInterval(0, 1 << 40))
    metrics = [
        hp.Metric("test/accuracy", display_name="test accuracy"),
        hp.Metric("test/loss", display_name="test loss"),
        hp.Metric("validation/accuracy", display_name="validation accuracy"),
        hp.Metric("train/seconds", display_name="training seconds"),
    ]
    with tf.summary.create_file_writer(str(logdir)).as_default():
        hp.hparams_config(hparams=[h_model, h_opt, h_lr, h_bs, h_ep, h_drop, h_params], metrics=metrics)
    for r in rows:
        p = models[r["model"]]
        with tf.summary.create_file_writer(str(logdir / r["model"])).as_default():
            hp.hparams(
                {
                    h_model: r["model"],
                    h_opt: p.optimizer,
                    h_lr: p.learning_rate,
                    h_bs: p.batch_size,
                    h_ep: p.epochs,
                    h_drop: dropout(p),
                    h_params: int(r["parameters"]),
                },
                trial_id=r["model"],
            )
            tf.summary.scalar("test/accuracy", r["accuracy"], step=0)
            tf.summary.scalar("test/loss", r["loss"], step=0)
            tf.summary.scalar("validation/accuracy", r["val_accuracy"], step=0)
            tf.summary.scalar("train/seconds", r["train_seconds"], step=0)


def write_outputs(rows: list[dict], data_report: dict, seed: int, leaderboard: Path, report: Path) -> None:
    """The leaderboard metrics file and data/report.md."""
    artifacts.write_leaderboard(leaderboard, leaderboard_json(rows))
    artifacts.write_report(report, report_markdown(rows, data_report, seed))
