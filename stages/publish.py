"""DVC stage `publish`: copy each blessed model's SavedModel into the serving folder as a new version when it changed."""

from __future__ import annotations

from pathlib import Path

# pipeline.stage first: it stops on a bad PREFECT_* setting, naming it, before Prefect's flows load.
from pipeline.stage import as_task, run_stage

# isort: split

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from pipeline import artifacts, serving
from pipeline.config import Params


@flow(name="publish")
def publish_flow(params: Params, exports: Path) -> None:
    """Publish every blessed model's SavedModel into params.yaml's serving folder, keeping its last versions;
    but a model with a version in the registry's serving stage, which `mnist promote` publishes.

    The serving folder is no DVC output: this stage has none, so DVC never deletes a version, and
    it runs whenever an export changed (or with `dvc repro --force publish`).

    Args:
        params: params.yaml, validated
        exports: folder holding one export folder per model
    """
    logger = get_run_logger()
    base, rows, stage = Path(params.serving.base), [], params.serving.stage
    for model in params.gates:  # one gate per model: the model names, without loading the registry
        record = artifacts.read_export_record(exports / model)
        if not record["blessed"]:
            logger.info("%s: not blessed, nothing to publish", model)
            continue
        in_stage = serving.assignments(Path.cwd(), model).get(stage)
        if in_stage:
            logger.info("%s: %s of the registry serves (its stage %s); `mnist promote` publishes it", model, in_stage[-1], stage)
            continue
        done = as_task(serving.publish, f"publish {model}")(
            model, exports / model / artifacts.SAVED_MODEL, base / model, params.serving.keep
        )
        logger.info(
            "%s: %s version %d in %s", model, "published" if done.new else "unchanged, newest is", done.version, base / model
        )
        rows.append(
            {"model": model, "version": str(done.version), "new": "yes" if done.new else "no", "deleted": str(done.removed or "")}
        )
    create_table_artifact(rows, key="serving", description=f"SavedModel versions in {base}")


if __name__ == "__main__":
    run_stage(publish_flow)
