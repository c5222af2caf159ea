"""What every stage entry point shares: load params, check Prefect, run the stage's flow.

A user mistake (PipelineError) ends the stage with its one-paragraph message and exit
status 1, never a traceback. The flow run is named `<stage>-<model>` and tagged with the
stage, the model and the pipeline run id, so all runs of one `dvc repro` group together.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from typing import Any

import httpx

from pipeline.config import load_params
from pipeline.errors import PipelineError

RUN_ID_ENV = "PIPELINE_RUN_ID"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"

logging.getLogger("pipeline").setLevel(logging.INFO)


def pipeline_run_id() -> str:
    """The id shared by every stage of one pipeline run (set by the run command), else a fresh one."""
    return os.environ.get(RUN_ID_ENV) or time.strftime("manual-%Y%m%d-%H%M%S")


def run_tag(run_id: str) -> str:
    """The Prefect tag that every flow run of one pipeline run carries."""
    return f"pipeline-run:{run_id}"


def mark_killed_runs(run_id: str) -> list[str]:
    """Mark the flow runs of pipeline run `run_id` that never reported an end as Crashed; return their names.

    A stage process killed outright (SIGKILL, out of memory) cannot report, and its flow run
    would show as running forever. The run command calls this once `dvc repro` is over.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = FlowRunFilter(
        tags=FlowRunFilterTags(all_=[run_tag(run_id)]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])),
    )
    message = "the stage process ended without reporting (killed?); see the output of dvc repro"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=unfinished)
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return [run.name for run in runs]


def prefect_settings() -> dict:
    """Prefect setting overrides for a stage's flow run: heartbeats off, unless the user set them.

    The heartbeat thread sleeps in 1 s steps and the flow waits for it at its end, so they
    cost a stage up to a second. They only help together with an automation that marks runs
    without heartbeats as crashed; set PREFECT_FLOWS_HEARTBEAT_FREQUENCY to have them.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    return {} if HEARTBEAT_ENV in os.environ else {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def check_prefect_api(timeout_s: float = 3.0) -> str | None:
    """The configured Prefect API URL if it answers; None if none is configured.

    A configured server that does not answer stops the stage within `timeout_s`, before
    any work, rather than letting Prefect hang or silently drop the run's records. Prefect
    settings it cannot read (a bad PREFECT_* variable) stop it too, with the setting named.
    """
    from pydantic import ValidationError

    try:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))} = {e['input']!r}: {e['msg']}" for e in exc.errors())
        raise PipelineError(
            f"Prefect cannot read its settings ({exc.title}: {problems}). Fix or unset the PREFECT_* "
            "environment variable of that name (or the entry of your Prefect profile, `prefect config view`)."
        ) from None
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
        # TensorFlow is loaded now (the model registry imports it) and stays for the whole
        # process. Freezing its objects keeps each later garbage collection, during Prefect's
        # import and the flow, from walking them all again: about 0.15 s per stage.
        gc.freeze()
        from prefect import tags
        from prefect.settings import temporary_settings

        from pipeline import flows

        flow_fn = getattr(flows, flow_name)

        labels = [f"stage:{stage}", run_tag(pipeline_run_id())] + ([f"model:{model}"] if model else [])
        run_name = f"{stage}-{model}" if model else stage
        extra = {"model": model} if model is not None else {}
        with temporary_settings(updates=prefect_settings()), tags(*labels):
            state = flow_fn.with_options(flow_run_name=run_name)(params=params, **extra, **kwargs, return_state=True)
        if state.is_failed() or state.is_crashed():
            error = state.result(raise_on_failure=False)
            if isinstance(error, BaseException):
                raise error
            raise PipelineError(f"stage {run_name} ended as {state.name}: {state.message}")
        # Every output is written and closed. Python's last garbage collection at exit walks
        # all the objects TensorFlow and Prefect made (about 1 s); frozen ones are skipped.
        # The atexit handlers, which send Prefect its last logs and events, still run.
        gc.freeze()
    except PipelineError as exc:
        print(f"\nerror in stage {stage}{'@' + model if model else ''}: {exc}", file=sys.stderr)
        sys.exit(1)
