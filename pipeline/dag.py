"""The end-to-end Prefect flow: the whole DVC DAG, one task per stage, run through DVC.

DVC stays the one record: every stage runs as `dvc repro --single-item <stage>`, so DVC
decides whether it is stale and writes dvc.lock. The flow adds what a Prefect user
expects: each stage as a task whose state says whether it ran, was up to date, failed,
or was not run because a stage it depends on failed; retries; a schedule (`mnist serve`).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import networkx as nx
from prefect import State, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed

from pipeline import progress
from pipeline.stage import RUN_ID_ENV, record_run, run_tag

RAN, RESTORED, UP_TO_DATE, FAILED, NOT_RUN = "ran", "restored", "up to date", "failed", "not run"
# Set by `mnist serve` for its deployment's runs: the one folder they may run. Anyone who reaches the
# server can start a run with any parameters, and a folder's dvc.yaml runs commands as this user.
SERVED_ROOT_ENV = "MNIST_SERVED_ROOT"


def stages_in_order(root: Path = Path(".")) -> tuple[list[str], dict[str, set[str]]]:
    """Stage names in an order DVC can run them (dvc.yaml order where free), and each stage's upstream stages."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        position = {stage: i for i, stage in enumerate(repo.index.stages)}
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: position[s])
        names = [s.addressing for s in order]
        upstream = {s.addressing: {d.addressing for d in graph.successors(s)} for s in graph.nodes}
    return names, upstream


def planned_stages(root: Path, targets: list[str], single_item: bool) -> list[str]:
    """The stages `dvc repro TARGETS` considers, in an order DVC can run them: all of them without targets;
    a target (`train@cnn`, or a foreach group such as `train`) and, unless `single_item`, what it depends on."""
    order, upstream = stages_in_order(root)
    if not targets:
        return order
    wanted: set[str] = set()
    for target in targets:
        matched = [s for s in order if s == target or s.split("@")[0] == target]
        wanted.update(matched)
    if not single_item:
        todo = list(wanted)
        while todo:
            for dependency in upstream.get(todo.pop(), ()):
                if dependency not in wanted:
                    wanted.add(dependency)
                    todo.append(dependency)
    return [s for s in order if s in wanted]


@task(cache_policy=NO_CACHE, retries=0)
def repro_stage(stage: str, root: Path, run_id: str) -> State:
    """`dvc repro --single-item <stage>`: DVC runs it if stale and records it in dvc.lock."""
    logger = get_run_logger()
    env = {**os.environ, RUN_ID_ENV: run_id}
    done = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=root, env=env, capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        logger.error("stage %s failed:\n%s", stage, output[-4000:])
        return Failed(message=f"stage {stage} failed: {output.splitlines()[-1] if output else done.returncode}")
    outcome = progress.repro_outcomes(output).get(stage)
    if outcome == progress.RAN:
        logger.info("stage %s ran", stage)
        return Completed(message=RAN)
    if outcome == progress.RESTORED:
        logger.info("stage %s restored from DVC's run-cache", stage)
        return Completed(message=RESTORED, name="Restored")
    logger.info("stage %s is up to date", stage)
    return Completed(message=UP_TO_DATE, name="Up to date")


@task(cache_policy=NO_CACHE)
def not_run(stage: str, because: str) -> State:
    """A stage skipped because a stage it depends on failed."""
    return Cancelled(message=f"{NOT_RUN}: {because} failed", name="Not run")


@flow(name="pipeline")
def pipeline_flow(root: str = ".") -> dict[str, str] | State:
    """Run every stage of the DVC pipeline in order; return each stage's outcome."""
    logger = get_run_logger()
    path = Path(root).resolve()
    served = os.environ.get(SERVED_ROOT_ENV)
    if served and path != Path(served).resolve():
        logger.error("refused: this deployment runs the pipeline of %s only, not of %s", served, path)
        return Failed(message=f"this deployment runs the pipeline of {served} only; root={root} refused")
    run_id = os.environ.get(RUN_ID_ENV) or f"flow-{flow_run.get_name()}"
    order, upstream = stages_in_order(path)
    logger.info("%d stages: %s", len(order), ", ".join(order))
    outcome: dict[str, str] = {}
    for position, stage in enumerate(order, start=1):
        broken = sorted(u for u in upstream[stage] if outcome.get(u) in (FAILED, NOT_RUN))
        if broken:
            not_run.with_options(task_run_name=stage)(stage, ", ".join(broken))
            outcome[stage] = NOT_RUN
        else:
            started = time.monotonic()
            state = repro_stage.with_options(task_run_name=stage)(stage, path, run_id, return_state=True)
            outcome[stage] = FAILED if state.is_failed() else state.message  # type: ignore[assignment]  # repro_stage's states carry a message
        seconds = time.monotonic() - started if outcome[stage] != NOT_RUN else 0.0
        logger.info("[%d/%d] %s: %s, %.1f s", position, len(order), stage, outcome[stage], seconds)
    summary = {k: sum(v == k for v in outcome.values()) for k in (RAN, RESTORED, UP_TO_DATE, FAILED, NOT_RUN)}
    logger.info("stages: %s", ", ".join(f"{n} {k}" for k, n in summary.items()))
    if summary[FAILED]:
        failed = [s for s, o in outcome.items() if o == FAILED]
        return Failed(message=f"failed: {', '.join(failed)}; not run: {summary[NOT_RUN]} stage(s)")
    return outcome


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.dag`: run the flow once; with --serve, serve it as a deployment on a schedule."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help="serve a deployment instead of running once")
    parser.add_argument("--name", default="scheduled", help="deployment name (with --serve)")
    parser.add_argument("--cron", default="0 3 * * *", help="schedule (with --serve); '' for none")
    args = parser.parse_args(argv)
    if args.serve:
        os.environ[SERVED_ROOT_ENV] = str(Path.cwd().resolve())  # the runs it starts inherit it
        pipeline_flow.serve(name=args.name, cron=args.cron or None, parameters={"root": str(Path.cwd())})
    else:
        run_id = os.environ.setdefault(RUN_ID_ENV, time.strftime("flow-%Y%m%d-%H%M%S"))
        state = pipeline_flow.with_options(on_running=[record_run([run_tag(run_id)])])(root=".", return_state=True)
        raise SystemExit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()
