"""DVC stage `train@<model>`: train one registry model on the prepared data, resuming an interrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

# pipeline.stage first: it stops on a bad PREFECT_* setting, naming it, before Prefect's flows load.
from pipeline.stage import TENSORBOARD_URL, artifact_key, as_task, run_stage

# isort: split

import keras
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, update_progress_artifact

from pipeline import artifacts, tables
from pipeline.config import Params
from pipeline.models.registry import PARAM_TYPES, REGISTRY
from pipeline.train.loop import save_trained, train_model


class PrefectProgress(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped: its classes are Any
    """A Prefect progress artifact, updated after every epoch (use inside a flow run)."""

    def __init__(self, name: str, epochs: int) -> None:
        super().__init__()
        self.name, self.epochs = name, epochs
        self.artifact_id: UUID | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.artifact_id = create_progress_artifact(  # type: ignore[assignment]  # called from sync code: a UUID, not a coroutine
            0.0, key=artifact_key("train-progress", self.name), description=f"epochs of {self.name} done"
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        update_progress_artifact(
            self.artifact_id,  # type: ignore[arg-type]  # set by on_train_begin, which Keras calls first
            100.0 * (epoch + 1) / self.epochs,
            description=f"{self.name}: epoch {epoch + 1}/{self.epochs}, val_accuracy {logs.get('val_accuracy', float('nan')):.4f}",
        )


@flow(name="train")
def train_flow(params: Params, model: str, data: Path, out: Path, live: Path, resume: Path, tensorboard: Path) -> None:
    """Train one registry model, resuming from its last completed epoch if it was interrupted.

    Args:
        params: params.yaml, validated, each model's block typed
        model: a model name from params.yaml's models section
        data: folder of the prepared arrays
        out: folder for model.keras, meta.json, timings.json
        live: DVCLive's folder: per-epoch metrics (plots/metrics/*/*.tsv) and the latest ones (metrics.json)
        resume: folder for per-epoch checkpoints and the TensorBoard events of the run in progress (not a DVC output)
        tensorboard: TensorBoard run folder, filled when training completes
    """
    p = params.model(model)
    splits = as_task(artifacts.load_prepared, "load data")(data)
    result = as_task(train_model, f"fit {model}")(
        model, p, params.seed, params.train, splits, data, resume, live, callbacks=[PrefectProgress(model, p.epochs)]
    )
    as_task(save_trained, "save model")(result, model, p, params.seed, out, resume, tensorboard)
    meta, timings = artifacts.read_meta(out), artifacts.read_timings(out, "train")
    summary = tables.markdown(
        ["epochs", "parameters", "val_accuracy", "seconds"],
        [[meta["epochs"], f"{meta['parameters']:,}", f"{meta['val_accuracy']:.4f}", timings["train_seconds"]]],
    )
    create_markdown_artifact(
        f"### {model}: training\n\n{REGISTRY[model].description}\n\n{summary}\n",
        key=artifact_key("train", model),
        description=f"training summary of {model}",
    )
    create_link_artifact(
        f"{TENSORBOARD_URL}/#timeseries&runFilter=train/{model}",
        link_text=f"TensorBoard: train/{model}",
        key=artifact_key("tensorboard", model),
    )


if __name__ == "__main__":
    run_stage(train_flow, PARAM_TYPES)
