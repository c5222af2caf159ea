"""DVC stage `report`: the leaderboard of all models (metrics file, data/report.md, TensorBoard HParams)."""

from __future__ import annotations

from pathlib import Path

# pipeline.stage first: it stops on a bad PREFECT_* setting, naming it, before Prefect's flows load.
from pipeline.stage import as_task, run_stage

# isort: split

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from pipeline import artifacts, report
from pipeline.config import Params
from pipeline.models.params import PARAM_TYPES


@flow(name="report")
def report_flow(
    params: Params, models: Path, evaluations: Path, data_report: Path, leaderboard: Path, out: Path, tensorboard: Path
) -> None:
    """The leaderboard of all models: metrics file, markdown report, Prefect table, TensorBoard HParams.

    Args:
        params: params.yaml, validated, each model's block typed
        models: folder holding one train output folder per model
        evaluations: folder holding one evaluate folder per model
        data_report: the preprocess stage's data report
        leaderboard: the leaderboard metrics file (JSON)
        out: the markdown report
        tensorboard: TensorBoard folder for the HParams view
    """
    rows = report.read_rows(models, evaluations, list(params.models))
    as_task(report.write_outputs, "write leaderboard")(
        rows, artifacts.read_data_report(data_report), params.seed, leaderboard, out
    )
    as_task(report.write_hparams, "tensorboard hparams")(rows, params.models, tensorboard)
    create_table_artifact(
        report.leaderboard_table(rows), key="leaderboard", description="test accuracy of every model, best first"
    )
    for r in rows:
        get_run_logger().info("%-10s %.4f %s", r["model"], r["accuracy"], "" if r["blessed"] else "(under its gate)")


if __name__ == "__main__":
    run_stage(report_flow, PARAM_TYPES)
