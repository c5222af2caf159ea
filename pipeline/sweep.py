"""DVC experiments on a Prefect work pool: `mnist sweep --work-pool POOL`.

The coordinator is the user's clone, at a commit pushed to its git origin. The experiments
queued there on that commit (`dvc exp run --queue -S ...`, or `mnist sweep -S ...`, which queues
them the same way) each become one `dvc-experiment` flow run on the pool. A worker runs it in its
workspace of the project (fanout.chain_workspace): the files the queued entry changes
(params.yaml, say) written over the commit, then `dvc exp run --pull -n NAME`, whose stages
that the experiment leaves unchanged restore from the run-cache on the DVC remote; then
`dvc exp push origin NAME`, which sends the experiment's git ref to the origin and its outputs
to the remote. The coordinator pulls each experiment as it ends (`dvc exp pull origin NAME`) and
removes its queue entry: `dvc exp show`, `dvc exp apply` and `mnist compare` then see it as one
run on this machine. The options given to `dvc exp run --queue` besides the params (targets,
--force) are not carried: a worker runs the whole pipeline, as the queue's own workers do by default.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import State, flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Failed

from pipeline.errors import PipelineError
from pipeline.fanout import (
    add_remote,
    chain_workspace,
    check_deployment,
    command,
    default_remote,
    dvc_env,
    kept_warm_server,
    label_run,
    on_pool,
    pushed_commit,
    ran_stages,
    restored_stages,
    run_once,
)
from pipeline.stage import RUN_ID_ENV, run_tag

EXPERIMENT_FLOW = "dvc-experiment"  # deployed on each pool by `mnist deploy` (fanout.DEPLOYED_FLOWS)
QUEUE_FILES = ".dvc/tmp/"  # what DVC's queue adds to an entry besides the user's changes (its repro arguments)
MAX_FILES_BYTES = 1 << 20  # the changed files travel as a flow-run parameter, stored on the Prefect server


@dataclass
class Queued:
    """One experiment in DVC's queue: its name, the entry's commit, the files it changes against its baseline
    (the text of each, None for a file it deletes), and who queued it (git's user.name and user.email)."""

    name: str
    rev: str
    files: dict[str, str | None]
    author: dict[str, str]


def queued(root: Path, commit: str) -> list[Queued]:
    """The experiments queued in `root` on `commit`, its HEAD (`dvc exp show` lists those of HEAD only);
    PipelineError for an entry that cannot travel to a worker (a binary or too large file), or for none at all."""
    import dvc.api

    rows = [row for row in dvc.api.exp_show(str(root)) if row.get("State") == "Queued" and row.get("Experiment")]
    if not rows:
        raise PipelineError(
            "No experiment is queued on this commit: queue some with `dvc exp run --queue -S PARAM=VALUE` "
            "(or `mnist sweep --work-pool POOL -S PARAM=VALUE,VALUE`). `dvc queue status` lists those of other commits."
        )
    entries = []
    for row in rows:
        name = str(row["Experiment"])
        rev = command(["git", "rev-parse", f"{row['rev']}^{{commit}}"], root).strip()
        files: dict[str, str | None] = {}
        for line in command(["git", "diff", "--name-status", "--no-renames", commit, rev], root).splitlines():
            status, path = line.split("\t", 1)
            if path.startswith(QUEUE_FILES):
                continue
            if status == "D":
                files[path] = None
                continue
            blob = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, check=True).stdout
            try:
                files[path] = blob.decode()
            except UnicodeDecodeError:
                raise PipelineError(
                    f"Experiment {name} changes {path}, which is not text: only text files travel to the workers."
                ) from None
        if sum(len(text or "") for text in files.values()) > MAX_FILES_BYTES:
            raise PipelineError(
                f"Experiment {name} changes more than {MAX_FILES_BYTES} bytes of files: commit them and queue it again."
            )
        who = command(["git", "log", "-1", "--format=%an%x00%ae", rev], root).strip().split("\0")
        entries.append(Queued(name, rev, files, {"name": who[0], "email": who[-1]}))
    return entries


def write_files(workspace: Path, files: dict[str, str | None]) -> None:
    """Write `files` (path: text, None to delete) over `workspace`; PipelineError, before any is written,
    for a path outside the workspace's files (absolute, through `..`, or in `.git`)."""
    for path in files:
        relative = Path(path)
        if relative.is_absolute() or not relative.parts or ".." in relative.parts or relative.parts[0] == ".git":
            raise PipelineError(
                f"Experiment file {path!r} is not a path inside the project: "
                "queue only changes to the project's own files (git diff names them)."
            )
    for path, text in files.items():
        target = workspace / path
        if text is None:
            target.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


def identity(author: dict[str, str]) -> dict[str, str]:
    """Git's environment that makes `author` ("name", "email") the author and committer of what DVC commits;
    nothing is written to the workspace's git config, and a worker needs no identity of its own."""
    return {f"GIT_{role}_{key.upper()}": author[key] for role in ("AUTHOR", "COMMITTER") for key in ("name", "email")}


def put_back(workspace: Path, files: dict[str, str | None]) -> None:
    """Undo write_files: each path as the checked-out commit has it, or gone if it has none."""
    for path in files:
        tracked = command(["git", "ls-files", "--", path], workspace).strip()
        if tracked:
            command(["git", "checkout", "--quiet", "HEAD", "--", path], workspace)
        else:
            (workspace / path).unlink(missing_ok=True)


@flow(name=EXPERIMENT_FLOW, flow_run_name="{name}")
def experiment_flow(
    name: str,
    files: dict[str, str | None],
    author: dict[str, str],
    repo: str,
    commit: str,
    remote: dict[str, str],
    run_id: str,
) -> dict[str, list[str]]:
    """Run one queued DVC experiment in this worker's workspace and push it to the project's git origin and DVC remote.

    Args:
        name: the experiment's name, as queued
        files: the files it changes against `commit` (path: text, None for a deleted file)
        author: who queued it ("name", "email"): the experiment's commit is theirs
        repo: the git URL of the project's origin: the workspace's, and where the experiment is pushed
        commit: the experiment's baseline commit (the coordinator's HEAD)
        remote: the DVC remote to pull inputs from and push outputs to: its URL ("url") and options, no credentials
        run_id: the sweep's run id: every stage's flow run is tagged with it
    """
    logger = get_run_logger()
    worker = os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname()
    logger.info("experiment %s on commit %s, worker %s: %s", name, commit[:12], worker, ", ".join(files) or "no change")
    with chain_workspace(repo, commit, worker) as (workspace, how):
        logger.info("workspace %s: %s", workspace, how)
        label_run(name, worker, how)
        env = dvc_env(workspace, run_id)
        add_remote(workspace, remote)
        write_files(workspace, files)
        try:
            warm_env = kept_warm_server(workspace, env)
            output = command(["dvc", "exp", "run", "--pull", "-n", name], workspace, {**env, **warm_env, **identity(author)})
            logger.info("dvc exp run --pull:\n%s", output[-3000:])
            command(["dvc", "exp", "push", "--run-cache", "origin", name], workspace, env)
        finally:
            put_back(workspace, files)  # the workspace as its commit has it, for the next chain or experiment
            try:
                command(["dvc", "exp", "remove", name], workspace, env)  # pushed, or failed: kept on the origin only
            except PipelineError:
                pass  # the run failed before DVC made the experiment
    return {"ran": ran_stages(output), "restored": restored_stages(output)}


@flow(name="pipeline-sweep")
def sweep_flow(pool: str, root: str = ".") -> dict[str, str] | State:
    """Every experiment queued on the coordinator's commit, each run on a worker of `pool` and pulled back.

    Args:
        pool: the work pool; its experiment deployment (dvc-experiment/<pool>) was registered by `mnist deploy`
        root: the coordinator's workspace (a clone of the project at a pushed commit)
    """
    logger = get_run_logger()
    path = Path(root).resolve()
    run_id = os.environ.get(RUN_ID_ENV) or f"sweep-{flow_run.get_name()}"
    commit, origin = pushed_commit(path)
    remote = default_remote(path)
    deployment = check_deployment(pool, EXPERIMENT_FLOW)
    entries = {entry.name: entry for entry in queued(path, commit)}
    env = dvc_env(path, run_id)
    start = time.perf_counter()
    command(["dvc", "repro", "--pull", "preprocess"], path, env)  # the inputs every experiment shares, made once
    command(["dvc", "push", "--run-cache"], path, env)  # with what this clone ran before: the workers restore it
    logger.info(
        "inputs ready and pushed in %.1f s; %d experiments to run: %s",
        time.perf_counter() - start,
        len(entries),
        ", ".join(entries),
    )
    parameters = {"repo": origin, "commit": commit, "remote": remote, "run_id": run_id}
    futures = {
        on_pool.submit(
            f"experiment {e.name}",
            deployment,
            {"name": e.name, "files": e.files, "author": e.author, **parameters},
            [run_tag(run_id), f"experiment:{e.name}"],
        ): e.name
        for e in entries.values()
    }
    outcome: dict[str, str] = {}
    for future in as_completed(list(futures)):  # each experiment pulled as it ends, while the others run
        name = futures[future]
        future.wait()  # done already; this sets its final state
        if not future.state.is_completed():
            outcome[name] = f"failed: {future.state.message or future.state.name}"
            logger.error("experiment %s failed, left in the queue: %s", name, future.state.message)
            continue
        command(["dvc", "exp", "pull", "origin", name], path, env)
        command(["dvc", "queue", "remove", entries[name].rev], path, env)
        outcome[name] = "pulled"
        logger.info("experiment %s pulled", name)
    failed = {name: why for name, why in outcome.items() if why.startswith("failed")}
    if failed:
        return Failed(message="; ".join(f"{name} {why.splitlines()[0]}" for name, why in failed.items()))
    return outcome


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.sweep POOL`: the sweep flow once, tagged with the run."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", help="the Prefect work pool whose workers run the experiments")
    run_once(sweep_flow, parser.parse_args(argv).pool, "sweep")


if __name__ == "__main__":
    main()
