"""DVC stage `evaluate@<model>`: test metrics, plot files, TensorBoard views and the quality gate."""

from __future__ import annotations

from pathlib import Path

# pipeline.stage first: it stops on a bad PREFECT_* setting, naming it, before Prefect's flows load.
from pipeline.stage import artifact_key, as_task, pipeline_run_id, run_stage

# isort: split

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline import alerts, artifacts, tables
from pipeline.config import Params
from pipeline.evaluate import pictures, scores, tensorboard as views
from pipeline.models.registry import PARAM_TYPES


@flow(name="evaluate")
def evaluate_flow(params: Params, model: str, model_dir: Path, live: Path, data: Path, out: Path, tensorboard: Path) -> None:
    """Score one trained model on the test set, decide its gate, write metrics, plots and summaries.

    Args:
        params: params.yaml, validated, each model's block typed
        model: a model name from params.yaml's models section
        model_dir: the train stage's output folder
        live: the train stage's DVCLive folder (per-epoch metrics, for curves.png)
        data: folder of the prepared arrays
        out: folder for metrics.json, timings.json, predictions.csv, ...
        tensorboard: TensorBoard run folder
    """
    keras_model = as_task(artifacts.read_model, "load model")(model_dir)
    test = as_task(artifacts.load_prepared, "load data")(data)["test"]
    ev = as_task(scores.evaluate_model, "predict test set")(keras_model, test, params.gates[model], params.evaluate.batch_size)
    as_task(artifacts.write_evaluation, "write metrics")(out, model, ev.metrics, ev.timings, test.y, ev.predictions, ev.per_class)
    drawn = as_task(pictures.write_report_pictures, "draw pictures")(
        ev, test, live, model, out, params.evaluate.misclassified_grid
    )
    as_task(views.write_summaries, "tensorboard")(
        keras_model, ev, test, drawn, model, tensorboard, params.evaluate.embedding_sample
    )
    m = ev.metrics
    verdict = "passes" if m["blessed"] else "is UNDER"
    get_run_logger().info("%s: test accuracy %.4f %s its gate %.4f", model, m["accuracy"], verdict, m["gate"])
    if not m["blessed"]:  # `mnist alerts` turns this event into a notification
        alerts.gate_missed(model, m["accuracy"], m["gate"], pipeline_run_id())
    create_markdown_artifact(
        f"### {model}: test metrics\n\n{tables.markdown(['metric', 'value'], [*m.items(), *ev.timings.items()])}\n",
        key=artifact_key("metrics", model),
        description=f"test metrics of {model}",
    )


if __name__ == "__main__":
    run_stage(evaluate_flow, PARAM_TYPES)
