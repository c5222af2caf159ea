"""The leaderboard of all models: a DVC metrics file, data/report.md, and TensorBoard's HParams view."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import tensorflow as tf

from pipeline.config import Params
from pipeline.data import atomic_write
from pipeline.evaluate import METRICS_FILE

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


def read_metrics(evaluate_dir: Path, models: list[str]) -> list[dict]:
    """Each model's metrics.json, best test accuracy first."""
    rows = [json.loads((evaluate_dir / name / METRICS_FILE).read_text()) for name in models]
    return sorted(rows, key=lambda r: -r["accuracy"])


def leaderboard_json(rows: list[dict]) -> dict:
    """The leaderboard as DVC metrics: one entry per model."""
    keep = [key for key, _ in COLUMNS if key != "model"]
    return {"models": {r["model"]: {k: r[k] for k in keep} for r in rows}}


def _cell(key: str, value) -> str:
    if key in ("accuracy", "gate"):
        return f"{100 * value:.2f}%"
    if key == "blessed":
        return "yes" if value else "**no**"
    if key in ("parameters", "eval_images_per_s"):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report_markdown(rows: list[dict], data_report: dict, params: Params) -> str:
    """data/report.md: the leaderboard, then each model's confusion matrix and training curves."""
    lines = [
        "# MNIST pipeline report",
        "",
        f"Test accuracy on the {rows[0]['test_images']:,} MNIST test images, best first. A model passes its gate",
        "(params.yaml `gates`) when its test accuracy is at least the gate; only those are exported.",
        f"Training: {data_report['splits']['train']['images']:,} images, validation {data_report['splits']['val']['images']:,};",
        f"seed {params.seed}; TensorFlow {tf.__version__}; {platform.machine()}, {_cpu_name()}.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(key, r[key]) for key, _ in COLUMNS) + " |" for r in rows]
    for r in rows:
        name = r["model"]
        lines += [
            "",
            f"## {name}",
            "",
            f"Test accuracy {100 * r['accuracy']:.2f}% (gate {100 * r['gate']:.2f}%: {'passed' if r['blessed'] else 'NOT passed, not exported'}),"
            f" macro precision {r['macro_precision']:.4f}, recall {r['macro_recall']:.4f}, F1 {r['macro_f1']:.4f}.",
            "",
            f"![{name} training curves](evaluate/{name}/curves.png)",
            f"![{name} confusion matrix](evaluate/{name}/confusion.png)",
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


def dropout(params: dict) -> float:
    """The model's largest drop rate (0 for models without dropout)."""
    return max([float(v) for k, v in params.items() if k.endswith("_drop") or k == "dropout"] or [0.0])


def write_hparams(rows: list[dict], params: Params, logdir: Path) -> None:
    """TensorBoard HParams: one session per model with its hyper-parameters and final metrics."""
    from tensorboard.plugins.hparams import api as hp

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
        p = params.models[r["model"]]
        with tf.summary.create_file_writer(str(logdir / r["model"])).as_default():
            hp.hparams(
                {
                    h_model: r["model"],
                    h_opt: p["optimizer"],
                    h_lr: float(p["learning_rate"]),
                    h_bs: int(p["batch_size"]),
                    h_ep: int(p["epochs"]),
                    h_drop: dropout(p),
                    h_params: int(r["parameters"]),
                },
                trial_id=r["model"],
            )
            tf.summary.scalar("test/accuracy", r["accuracy"], step=0)
            tf.summary.scalar("test/loss", r["loss"], step=0)
            tf.summary.scalar("validation/accuracy", r["val_accuracy"], step=0)
            tf.summary.scalar("train/seconds", r["train_seconds"], step=0)


def write_outputs(rows: list[dict], data_report: dict, params: Params, leaderboard: Path, report: Path) -> None:
    atomic_write(leaderboard, (json.dumps(leaderboard_json(rows), indent=2) + "\n").encode())
    atomic_write(report, report_markdown(rows, data_report, params).encode())
