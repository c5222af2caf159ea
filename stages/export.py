"""DVC stage `export@<model>`: a verified SavedModel for a blessed model, a record for any model."""

from __future__ import annotations

from pathlib import Path

# pipeline.stage first: it stops on a bad PREFECT_* setting, naming it, before Prefect's flows load.
from pipeline.stage import artifact_key, as_task, run_stage

# isort: split

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline import artifacts, card, export
from pipeline.config import Params
from pipeline.models.registry import PARAM_TYPES, REGISTRY


@flow(name="export")
def export_flow(params: Params, model: str, model_dir: Path, evaluation: Path, data: Path, out: Path, tensorboard: Path) -> None:
    """Export a blessed model as a verified SavedModel; record why an unblessed one is not.

    Args:
        params: params.yaml, validated, each model's block typed
        model: a model name from params.yaml's models section
        model_dir: the train stage's output folder
        evaluation: the evaluate stage's output folder
        data: folder of the prepared arrays
        out: folder for saved_model/, export.json, timings.json and card.md
        tensorboard: TensorBoard run folder
    """
    logger = get_run_logger()
    metrics = artifacts.read_metrics(evaluation)
    export.prepare(out, tensorboard)
    reason = export.refusal(model, metrics)
    if reason is not None:
        logger.warning(reason)
        record = export.refused_record(model, metrics, reason)
        artifacts.write_export_record(out, record)
        export.write_summaries(tensorboard, record, None, signature=None)
        return
    keras_model = as_task(artifacts.read_model, "load model")(model_dir)
    with export.staged(out, keras_model) as staging:  # final only once complete and verified
        as_task(export.save_servable, "write SavedModel")(keras_model, staging)
        check = as_task(export.verify_in_fresh_process, "verify in fresh process")(
            staging, data, evaluation, params.export.latency_repeats
        )
    folder = out / artifacts.SAVED_MODEL
    record, timings = export.exported_record(model, folder, check), export.latency_timings(check)
    artifacts.write_export_record(out, record)
    artifacts.write_timings(out, timings)
    actual, predicted = artifacts.read_labels_and_predictions(evaluation)
    inputs = {
        str(p): p
        for p in (model_dir / artifacts.MODEL_FILE, evaluation / artifacts.METRICS_FILE, evaluation / artifacts.PREDICTIONS_FILE)
    }
    text = card.model_card(
        model,
        REGISTRY[model].description,
        params.models[model].model_dump(mode="json"),
        artifacts.split_sizes(data),
        params.seed,
        metrics,
        actual,
        predicted,
        timings,
        card.git_source(Path.cwd(), inputs),
    )
    artifacts.write_card(out, text)
    create_markdown_artifact(text, key=artifact_key("card", model), description=f"model card of {model}")
    logger.info(
        "%s exported to %s (%.1f MB); fresh-process check: %d test predictions identical; latency %.2f ms (batch 1), %.2f ms (batch 256)",
        model,
        folder,
        record["bytes"] / 1e6,
        check["test_images"],
        timings["latency_ms_batch_1"],
        timings["latency_ms_batch_256"],
    )
    export.write_summaries(tensorboard, record, timings, check["signature"])


if __name__ == "__main__":
    run_stage(export_flow, PARAM_TYPES)
