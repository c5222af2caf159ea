"""What every stage entry point shares: load params, check Prefect, run the stage's flow.

A user mistake (PipelineError) ends the stage with its one-paragraph message and exit
status 1, never a traceback. The flow run is named `<stage>-<model>` and tagged with the
stage, the model and the pipeline run id, so all runs of one `dvc repro` group together.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import httpx

from pipeline.config import load_params
from pipeline.errors import PipelineError

RUN_ID_ENV = "PIPELINE_RUN_ID"

logging.getLogger("pipeline").setLevel(logging.INFO)


def pipeline_run_id() -> str:
    """The id shared by every stage of one pipeline run (set by the run command), else a fresh one."""
    return os.environ.get(RUN_ID_ENV) or time.strftime("manual-%Y%m%d-%H%M%S")


def check_prefect_api(timeout_s: float = 3.0) -> str | None:
    """The configured Prefect API URL if it answers; None if none is configured.

    A configured server that does not answer stops the stage within `timeout_s`, before
    any work, rather than letting Prefect hang or silently drop the run's records.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except httpx.HTTPError as exc:
        raise PipelineError(
            f"The Prefect server at PREFECT_API_URL={url} does not answer ({type(exc).__name__}: {exc}). "
            "Start it with `make dashboards` (or `prefect server start`), or unset PREFECT_API_URL "
            "to run the stage with a temporary local server."
        ) from None
    return url


class HidePipelineTracebacks(logging.Filter):
    """Prefect logs a failed task's or flow's exception with its traceback; a PipelineError's message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info, record.exc_text = None, None
        return True


def run_stage(stage: str, flow_name: str, model: str | None = None, **kwargs: Any) -> None:
    """Run pipeline.flows.<flow_name> as the Prefect flow of DVC stage `stage` (for `model`, if per model).

    The checks come first and cheap: an unreachable Prefect server or a bad params.yaml
    stops the stage before TensorFlow is even imported, and before anything is written.
    """
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(HidePipelineTracebacks())
    try:
        check_prefect_api()
        params = load_params()
        if model is not None:
            params.model(model)  # an unknown model name stops here, before any work
        from prefect import tags

        from pipeline import flows

        flow_fn = getattr(flows, flow_name)

        labels = [f"stage:{stage}", f"pipeline-run:{pipeline_run_id()}"] + ([f"model:{model}"] if model else [])
        run_name = f"{stage}-{model}" if model else stage
        extra = {"model": model} if model is not None else {}
        with tags(*labels):
            state = flow_fn.with_options(flow_run_name=run_name)(params=params, **extra, **kwargs, return_state=True)
        if state.is_failed() or state.is_crashed():
            error = state.result(raise_on_failure=False)
            if isinstance(error, BaseException):
                raise error
            raise PipelineError(f"stage {run_name} ended as {state.name}: {state.message}")
    except PipelineError as exc:
        print(f"\nerror in stage {stage}{'@' + model if model else ''}: {exc}", file=sys.stderr)
        sys.exit(1)
