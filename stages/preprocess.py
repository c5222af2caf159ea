"""DVC stage `preprocess`: check the raw IDX files, split off validation, write arrays and a data report."""

from __future__ import annotations

from pathlib import Path

# pipeline.stage first: it stops on a bad PREFECT_* setting, naming it, before Prefect's flows load.
from pipeline.stage import as_task, run_stage

# isort: split

from prefect import flow, get_run_logger

from pipeline import artifacts, preprocess
from pipeline.config import Params


@flow(name="preprocess")
def preprocess_flow(params: Params, raw: Path, out: Path, report: Path, tensorboard: Path) -> None:
    """Check the raw files, split off the validation set, write the arrays and the data report.

    Args:
        params: params.yaml, validated
        raw: folder of the fetched IDX files
        out: folder for the prepared arrays
        report: the data report (JSON)
        tensorboard: TensorBoard run folder
    """
    raw_splits = as_task(preprocess.load_raw, "read IDX")(raw)
    train, val = as_task(preprocess.split_validation, "split validation")(raw_splits["train"], params.data, params.seed)
    splits = {"train": train, "val": val, "test": raw_splits["test"]}
    data_report = as_task(preprocess.data_report, "check and report")(splits)
    get_run_logger().info(
        "train %d, val %d, test %d images; %d test images also in train",
        len(train.y),
        len(val.y),
        len(splits["test"].y),
        data_report["test_images_duplicated_in_train"],
    )
    as_task(artifacts.save_prepared, "write arrays")(out, splits)
    artifacts.write_data_report(report, data_report)
    as_task(preprocess.write_summaries, "tensorboard")(splits, data_report, tensorboard)


if __name__ == "__main__":
    run_stage(preprocess_flow)
