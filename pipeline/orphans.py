"""Flow runs left Running by a stage process that is gone (killed outright, or cut off from its Prefect
server): marked Crashed, with the pipeline run they belong to, so that no run shows as running forever and
`mnist alerts` hears of it. `mnist run`, `mnist dashboards` and the background server's keeper of a bare
`dvc repro` (pipeline/servers.py) call mark_orphans."""

from __future__ import annotations

import sys
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import temporary_settings
from prefect.states import Crashed

from pipeline.stage import client_settings, run_tag, this_process


def mark_orphaned_runs() -> list[str]:
    """Mark as Crashed the stage flow runs on this machine that show as running but whose process is gone.

    Each stage records its process on its flow run (pipeline.stage.record_run). One killed outright,
    or that lost its Prefect server for longer than its client retries, could not report its end.
    Its pipeline run, if still running, is marked too (crash_pipeline_run).
    """
    import psutil

    host = this_process().split(":")[0]
    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])))
    marked = []
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=running):
            where, _, pid = (run.infrastructure_pid or "").rpartition(":")
            if where != host or not pid.isdigit() or not any(t.startswith("stage:") for t in run.tags):
                continue
            try:
                # a stage process: `python stages/<stage>.py`, or a fork of the warm server (pipeline/warm.py)
                alive = any("stages/" in part or part == "pipeline.warm" for part in psutil.Process(int(pid)).cmdline())
            except psutil.Error:
                alive = False
            if not alive:
                message = f"its stage process (PID {pid}) ended without reporting: killed, or its Prefect server was away"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                marked.append(run.name)
                marked += crash_pipeline_run(client, run.tags, f"{run.name}: {message}")
    return marked


def crash_pipeline_run(client: Any, tags: list[str], message: str) -> list[str]:
    """Mark the pipeline run of a stage run with `tags` Crashed if it still shows as running (a bare `dvc repro`
    whose stage was killed: no run command is left to end it); its name if it was marked."""
    run_id = next((tag.removeprefix(run_tag("")) for tag in tags if tag.startswith(run_tag(""))), None)
    if run_id is None:
        return []
    parents = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline-run"])),
        flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[run_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
        ),
    )
    for parent in parents:
        client.set_flow_run_state(parent.id, Crashed(message=message), force=True)
    return [parent.name for parent in parents]


def mark_orphans(api: str) -> None:
    """mark_orphaned_runs on the server at `api`, saying what it marked."""
    try:
        with temporary_settings(updates=client_settings(api)):
            crashed = mark_orphaned_runs()
    except Exception as exc:  # noqa: BLE001 - a dashboard detail must not stop the dashboards
        print(f"Prefect: could not check for orphaned stage runs ({type(exc).__name__}: {exc})", file=sys.stderr)
        return
    if crashed:
        print(f"Prefect: marked {', '.join(crashed)} as crashed: their stage processes are gone.", file=sys.stderr, flush=True)
