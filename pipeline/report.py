"""The leaderboard of all models: a DVC metrics file, data/report.md, and TensorBoard's HParams view."""

from __future__ import annotations

import platform
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tensorboard.plugins.hparams import summary_v2 as hp

from pipeline import artifacts, card, summaries, tables
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


def read_rows(models_dir: Path, evaluate_dir: Path, models: list[str]) -> list[dict[str, Any]]:
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


def leaderboard_json(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The leaderboard as DVC metrics, kept in git: each model's test accuracy, best first, so that
    `dvc metrics show` on a fresh clone shows them before any `dvc pull` (as `accuracy.cnn`, ...)."""
    return {key: {r["model"]: r[key] for r in rows} for key in LEADERBOARD_KEYS}


def cell(key: str, value: Any) -> str:
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


def leaderboard_table(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The leaderboard as the report shows it: one dict per model, column title -> cell."""
    return [{title: cell(key, r[key]) for key, title in COLUMNS} for r in rows]


def report_markdown(rows: list[dict[str, Any]], data_report: dict[str, Any], seed: int) -> str:
    """data/report.md: the leaderboard, then each model's confusion matrix and training curves."""
    lines = [
        "# MNIST pipeline report",
        "",
        f"Test accuracy on the {data_report['splits']['test']['images']:,} MNIST test images, best first. A model passes its gate",
        "(params.yaml `gates`) when its test accuracy is at least the gate; only those are exported.",
        f"Training: {data_report['splits']['train']['images']:,} images, validation {data_report['splits']['val']['images']:,};",
        f"random seed {seed}; TensorFlow {version('tensorflow')}; {platform.machine()}, {card.cpu_name()}.",
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


def dropout(p: ModelParams) -> float:
    """The model's largest drop rate (0 for models without dropout)."""
    knobs = p.model_dump()
    return max([float(v) for k, v in knobs.items() if k.endswith("_drop") or k == "dropout"] or [0.0])


HPARAM_METRICS = {  # each metric of a trial: its tag, its key in a leaderboard row (read_rows), its name in HParams
    "test/accuracy": ("accuracy", "test accuracy"),
    "test/loss": ("loss", "test loss"),
    "validation/accuracy": ("val_accuracy", "validation accuracy"),
    "train/seconds": ("train_seconds", "training seconds"),
}


def write_hparams_config(logdir: Path, models: list[str], experiments: list[str] | None = None) -> None:
    """TensorBoard HParams' table: the hyper-parameters and metrics of the trials under `logdir`.
    With `experiments` (mnist compare), each trial also carries its DVC experiment's name."""
    hparams = [
        hp.HParam("model", hp.Discrete(sorted(models))),
        hp.HParam("optimizer", hp.Discrete(["sgd", "momentum", "rmsprop", "adam"])),
        hp.HParam("learning_rate", hp.RealInterval(0.0, 10.0)),
        hp.HParam("batch_size", hp.IntInterval(1, 1 << 20)),
        hp.HParam("epochs", hp.IntInterval(1, 1 << 20)),
        hp.HParam("dropout", hp.RealInterval(0.0, 1.0)),
        hp.HParam("parameters", hp.IntInterval(0, 1 << 40)),
    ]
    if experiments:
        hparams.insert(0, hp.HParam("experiment", hp.Discrete(sorted(experiments))))
    metrics = [hp.Metric(tag, display_name=name) for tag, (_, name) in HPARAM_METRICS.items()]
    with summaries.EventWriter(logdir) as events:
        events.add(hp.hparams_config_pb(hparams=hparams, metrics=metrics))


def write_trial(logdir: Path, row: dict[str, Any], p: ModelParams, experiment: str | None = None) -> None:
    """One HParams trial in its own run folder: a model's hyper-parameters and final metrics (a leaderboard row).
    Its id is the model's name, or `<experiment>/<model>`, so that no two experiments' trials merge."""
    values = {
        "model": row["model"],
        "optimizer": p.optimizer,
        "learning_rate": p.learning_rate,
        "batch_size": p.batch_size,
        "epochs": p.epochs,
        "dropout": dropout(p),
        "parameters": int(row["parameters"]),
    }
    if experiment:
        values["experiment"] = experiment
    with summaries.EventWriter(logdir) as events:
        events.add(hp.hparams_pb(values, trial_id=f"{experiment}/{row['model']}" if experiment else row["model"]))
        for tag, (key, _) in HPARAM_METRICS.items():
            events.scalar(tag, row[key])


def write_hparams(rows: list[dict[str, Any]], models: dict[str, ModelParams], logdir: Path) -> None:
    """TensorBoard HParams: one trial per model with its hyper-parameters and final metrics (a fresh run folder)."""
    shutil.rmtree(logdir, ignore_errors=True)
    write_hparams_config(logdir, [r["model"] for r in rows])
    for r in rows:
        write_trial(logdir / r["model"], r, models[r["model"]])


def write_outputs(rows: list[dict[str, Any]], data_report: dict[str, Any], seed: int, leaderboard: Path, report: Path) -> None:
    """The leaderboard metrics file and data/report.md."""
    artifacts.write_leaderboard(leaderboard, leaderboard_json(rows))
    artifacts.write_report(report, report_markdown(rows, data_report, seed))
