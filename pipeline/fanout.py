"""Beyond one machine: each model's chain (train -> evaluate -> export) on a Prefect work pool.

The coordinator (`mnist flow --work-pool POOL`) runs where the user is. It runs or restores
fetch and preprocess, pushes them to the default DVC remote, and starts one `model-chain`
flow run per stale model on the pool. Each chain runs on a worker, in the worker's own
workspace of the project, kept between chains (a fetch and checkout of the coordinator's
commit; its DVC cache keeps the inputs of earlier chains), rebuilt when it was changed or its
cache damaged: it pulls the inputs it lacks, runs or restores its three stages, each forked
from a warm stage server, and pushes their outputs and run-cache entries. Nothing passes
through Prefect results; the DVC remote is the exchange. The coordinator restores each chain
from the run-cache as soon as it ends (a chain stage that runs on its side is a failure
naming the chain), then runs the report and publish stages, pushes, and leaves dvc.lock, of
which it is the only writer, ready to commit.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml
from prefect import State, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from pipeline import localserver, progress, warm
from pipeline.errors import PipelineError, redact_url
from pipeline.stage import HEARTBEAT_ENV, RUN_ID_ENV, HidePipelineTracebacks, record_run, run_tag

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

CHAIN_FLOW = "model-chain"  # deployed once per work pool, as model-chain/<pool>, by `mnist deploy`
CHAIN_STAGES = ("train", "evaluate", "export")
HEARTBEAT_S = 30  # a chain run's heartbeat (Prefect's minimum)
ZOMBIE_AFTER_S = 120  # a chain run without a heartbeat this long is marked Crashed
ZOMBIE_AUTOMATION = "mnist-chain-zombies"
LEASE_S = 60  # the lease on a chain's concurrency slot, renewed while it runs
POLL_S = 1.0  # how often the coordinator reads the state of each flow run it started on the pool (Prefect: 5 s)
# What DVC rewrites in the coordinator (dvc.lock, and under data/ the outputs kept in git and the
# .gitignore files it keeps beside its outputs): a tree where only these differ from the commit is clean.
WRITTEN_BY_DVC = ("dvc.lock", "data/")
COMMAND_TIMEOUT_S = 6 * 3600  # one dvc command; a chain trains a model
WORKSPACES_ENV = "MNIST_WORKSPACES"  # where a worker keeps its workspaces; default ~/.cache/mnist/workspaces


def command(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run `args` in `cwd`; return what it printed; raise PipelineError with its output's tail if it fails.

    It runs in a process group of its own: past `timeout_s`, the whole group (dvc and the stage it
    started) is killed, not dvc alone. URLs with credentials are masked in what it raises.
    """
    process = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise PipelineError(
            f"`{mask(' '.join(args))}` took longer than {timeout_s:.0f} s in {cwd}: stopped, with what it started"
        ) from None
    output = stdout + stderr
    if process.returncode != 0:
        raise PipelineError(f"`{mask(' '.join(args))}` failed ({process.returncode}) in {cwd}:\n{mask(output[-3000:])}")
    return output


def mask(text: str) -> str:
    """`text` with the user and password of every URL in it replaced by `***`."""
    return re.sub(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\1***@", text)


def refuse_credentials(url: str, what: str) -> str:
    """`url` as it is; PipelineError if it carries a password (or, for http(s), any user part): the workers
    get it as a flow-run parameter, which the server stores and shows."""
    parts = urlsplit(url) if "://" in url else None
    if parts and (parts.password or (parts.username and parts.scheme in ("http", "https"))):
        raise PipelineError(
            f"The {what} URL {redact_url(url)} carries credentials, which would reach every worker as a flow-run "
            "parameter, stored on the Prefect server. Use a URL without them and give the workers the credentials "
            "themselves: a git credential helper or SSH key for git; for DVC, `dvc remote modify --local NAME "
            "password ...` (or user, access_key_id, secret_access_key) on each worker, or the remote's environment "
            "variables (AWS_ACCESS_KEY_ID, ...)."
        )
    return url


def dvc_env(workspace: Path, run_id: str) -> dict[str, str]:
    """The environment of `dvc` in `workspace`: its stages import that workspace's own `pipeline`
    (and send no heartbeats: the chain run's own tell whether its worker is alive). Without the
    PREFECT__ variables a worker sets for the chain's flow run (its id, ...): each stage is a flow run
    of its own, and they differ from chain to chain, where the workspace's warm server, kept between
    chains, would refuse every stage that carried other values than its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
    env.update({"PYTHONPATH": str(workspace), RUN_ID_ENV: run_id})
    env.pop(HEARTBEAT_ENV, None)
    return env


def ran_stages(output: str) -> list[str]:
    """The stages `dvc repro`'s `output` says it ran (not restored, not up to date)."""
    return [stage for stage, outcome in progress.repro_outcomes(output).items() if outcome == progress.RAN]


def restored_stages(output: str) -> list[str]:
    """The stages `dvc repro`'s `output` says it restored from the run-cache."""
    return [stage for stage, outcome in progress.repro_outcomes(output).items() if outcome == progress.RESTORED]


def chain_targets(model: str) -> list[str]:
    return [f"{stage}@{model}" for stage in CHAIN_STAGES]


# --- the coordinator's checks ----------------------------------------------------------------


def changed_files(root: Path, untracked: bool) -> list[str]:
    """The files of `root` that differ from its commit (and, with `untracked`, those git does not track or
    ignore), leaving out what DVC writes (WRITTEN_BY_DVC); PipelineError if git cannot read `root`."""
    status = command(["git", "status", "--porcelain", f"--untracked-files={'normal' if untracked else 'no'}"], root)
    return [line[3:] for line in status.splitlines() if not line[3:].startswith(WRITTEN_BY_DVC)]


def pushed_commit(root: Path) -> tuple[str, str]:
    """The commit checked out in `root` and the URL of its `origin`; PipelineError unless it is clean and pushed.

    Workers clone that commit from origin, so it must be there, and the workspace must be
    exactly that commit (what DVC writes aside: dvc.lock and files under data/).
    """
    dirty = changed_files(root, untracked=False)
    if dirty:
        raise PipelineError(
            f"Uncommitted changes in {', '.join(dirty)}: the workers run the committed code and params. "
            "Commit them and `git push` (or stash them) first."
        )
    commit = command(["git", "rev-parse", "HEAD"], root).strip()
    try:
        origin = command(["git", "remote", "get-url", "origin"], root).strip()
    except PipelineError:
        raise PipelineError("This clone has no git remote `origin`: the workers clone the commit from there.") from None
    command(["git", "fetch", "--quiet", "origin"], root)
    if not command(["git", "branch", "--remotes", "--contains", commit], root).strip():
        raise PipelineError(f"Commit {commit[:12]} is not on origin ({redact_url(origin)}): `git push` it first.")
    return commit, refuse_credentials(origin, "git origin")


# The options of the default DVC remote that go to the workers with its URL (an S3-compatible server's
# address and region, timeouts, ...). Any other option, credentials above all (password, keyfile,
# access_key_id, secret_access_key, session_token, ...), stays with the coordinator: each worker has its own.
REMOTE_OPTIONS = (
    "endpointurl",
    "region",
    "profile",
    "use_ssl",
    "version_aware",
    "listobjects",
    "read_timeout",
    "connect_timeout",
    "port",
    "user",
    "acl",
    "sse",
)


def default_remote(root: Path) -> dict[str, str]:
    """The workspace's default DVC remote as the workers get it: its URL ("url") and its REMOTE_OPTIONS;
    PipelineError naming the fix if there is none, or if its URL carries credentials."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        config = dict(repo.config["remote"].get(name, {})) if name else {}
    if not config.get("url"):
        raise PipelineError(
            "No default DVC remote: the workers exchange data through it. Add one that every worker "
            "reaches, e.g. `dvc remote add -d shared ssh://host/path` (see docs/remotes.md)."
        )
    options = {
        key: str(config[key]).lower() if isinstance(config[key], bool) else str(config[key])
        for key in REMOTE_OPTIONS
        if key in config
    }
    return {"url": refuse_credentials(str(config["url"]), "DVC remote"), **options}


def add_remote(workspace: Path, remote: dict[str, str]) -> None:
    """Make `remote` (default_remote's) the default remote `exchange` of `workspace`, in .dvc/config.local."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo, repo.config.edit("local") as config:
        config["remote"]["exchange"] = dict(remote)
        config["core"]["remote"] = "exchange"


def stale_models(root: Path, models: list[str]) -> list[str]:
    """The models whose chain DVC's status reports changed or missing in `root` (`dvc status`, through Repo.status)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            dvc_yaml = Path(repo.root_dir) / "dvc.yaml"  # a bare stage name would be looked up from the working directory
            return [model for model in models if repo.status(targets=[f"{dvc_yaml}:{s}" for s in chain_targets(model)])]
    except DvcException as exc:
        raise PipelineError(f"`dvc status` failed in {root}: {mask(str(exc))}") from None


def check_deployment(pool: str, flow_name: str = CHAIN_FLOW) -> str:
    """The name of the pool's deployment of `flow_name`; PipelineError naming the command that registers it."""
    from prefect.exceptions import ObjectNotFound

    name = f"{flow_name}/{pool}"
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise PipelineError(
                f"No deployment {name} on this Prefect server: run `mnist deploy --work-pool {pool}` first."
            ) from None
    return name


# --- one chain, on a worker --------------------------------------------------------------------


def ensure_limit(name: str) -> None:
    """A global concurrency limit of one slot named `name` (created once)."""
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass


def chain_limit(model: str, commit: str) -> str:
    """The concurrency limit that keeps a chain from running twice at once for one commit."""
    return f"mnist-chain-{model}-{commit[:12]}"


def workspaces_home() -> Path:
    """The folder of this worker's workspaces ($MNIST_WORKSPACES, else ~/.cache/mnist/workspaces)."""
    return Path(os.environ.get(WORKSPACES_ENV) or Path.home() / ".cache" / "mnist" / "workspaces")


def damaged_objects(workspace: Path, since: float = 0.0) -> list[str]:
    """The objects of `workspace`'s DVC cache changed at `since` (a Unix time) or later whose bytes no longer
    hash to their name (DVC names each by its MD5). DVC writes an object once: any later change to it moves
    its ctime, which no one can set back, so the objects older than the last check need no new one."""
    damaged = []
    for path in sorted((workspace / ".dvc" / "cache" / "files" / "md5").glob("*/*")):
        if not (path.is_file() and re.fullmatch(r"[0-9a-f]{30}(\.dir)?", path.name)):
            continue  # not an object: a file DVC is still writing, say
        if path.stat().st_ctime < since:
            continue
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        if path.parent.name + path.name.removesuffix(".dir") != digest.hexdigest():
            damaged.append(f"{path.parent.name}/{path.name}")
    return damaged


def workspace_problem(workspace: Path, repo: str, since: float = 0.0) -> str | None:
    """Why `workspace` cannot serve another chain of `repo` as it is (None if it can): another origin, files
    changed by anyone but DVC, or DVC cache objects damaged (damaged_objects, among those changed since `since`)."""
    try:
        origin = command(["git", "remote", "get-url", "origin"], workspace).strip()
        changed = changed_files(workspace, untracked=True)
    except PipelineError as exc:
        return f"git cannot read it ({str(exc).splitlines()[0]})"
    if origin != repo:
        return f"it was cloned from {redact_url(origin)}"
    if changed:
        return f"files were changed in it: {', '.join(changed[:5])}"
    damaged = damaged_objects(workspace, since)
    if damaged:
        return f"its DVC cache is damaged: {', '.join(damaged[:5])}"
    return None


@contextmanager
def chain_workspace(repo: str, commit: str, worker: str) -> Iterator[tuple[Path, str]]:
    """A workspace of `repo` at `commit`, and how it was got: "reused", "new" or "rebuilt: <why>".

    It is this worker's own workspace of `repo`, kept between chains: fetched and checked out rather than
    cloned, its DVC cache kept, so a chain pulls only the inputs it lacks. One chain at a time holds it (a
    file lock); one that finds it held gets a fresh clone in a temporary folder, deleted at the end. A
    workspace that cannot be trusted (workspace_problem; the cache objects changed since the last chain that
    ended well) is deleted and cloned again.
    """
    home = workspaces_home()
    home.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{worker}\n{repo}".encode()).hexdigest()[:16]
    workspace, checked = home / key, home / f"{key}.checked"  # checked: its mtime is when the last chain ended well
    lock = os.open(home / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with tempfile.TemporaryDirectory(prefix="mnist-chain-") as tmp:
                yield checked_out(Path(tmp) / "workspace", repo, commit, fresh=True), "new (the worker's own is in use)"
            return
        how = "new"
        if (workspace / ".git").is_dir():
            why = workspace_problem(workspace, repo, checked.stat().st_mtime if checked.exists() else 0.0)
            how = f"rebuilt: {why}" if why else "reused"
        if how != "reused":
            checked.unlink(missing_ok=True)
            shutil.rmtree(workspace, ignore_errors=True)  # this worker's own copy, made by an earlier chain
        yield checked_out(workspace, repo, commit, fresh=how != "reused"), how
        checked.touch()
    finally:
        os.close(lock)


def checked_out(workspace: Path, repo: str, commit: str, fresh: bool) -> Path:
    """`workspace` at `commit` of `repo`: cloned if `fresh`, else fetched; dvc.lock and the rest as committed."""
    if fresh:
        command(["git", "clone", "--quiet", "--no-checkout", repo, str(workspace)], workspace.parent)
    else:
        command(["git", "fetch", "--quiet", "origin"], workspace)
    command(["git", "checkout", "--quiet", "--force", "--detach", commit], workspace)
    return workspace


def kept_warm_server(root: Path, env: dict[str, str], timeout_s: float = 60.0) -> dict[str, str]:
    """warm.kept_server for `root`, said in this flow run's log: it outlives the run until it is idle."""
    warm_env = warm.kept_server(root, env, timeout_s)
    if localserver.idle_s() > 0:
        get_run_logger().info(
            "warm stage server kept in %s: it stops after %.0f s without a stage, or with `mnist dashboards --stop`",
            root,
            localserver.idle_s(),
        )
    return warm_env


def label_run(what: str, worker: str, how: str) -> None:
    """Name this flow run `what@worker` and tag it with the worker and how its workspace was made
    (`how` as chain_workspace says it), so the dashboard shows who ran it, and in what workspace."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.get_id())  # type: ignore[arg-type]  # inside a flow run: its id, which the client takes as a str
        tags = {*run.tags, f"worker:{worker}", f"workspace:{how.split()[0].rstrip(':')}"}
        client.update_flow_run(run.id, name=f"{what}@{worker}", tags=sorted(tags))


@flow(name=CHAIN_FLOW, flow_run_name="{model}")
def chain_flow(model: str, repo: str, commit: str, remote: dict[str, str], run_id: str) -> dict[str, list[str]]:
    """Run or restore one model's train, evaluate and export stages in the worker's workspace, and push them.

    Args:
        model: the registry model whose chain to run
        repo: the git URL to clone the project from
        commit: the commit to check out (the coordinator's)
        remote: the DVC remote to pull inputs from and push outputs to: its URL ("url") and options, no credentials
        run_id: the pipeline run id: every stage's flow run is tagged with it
    """
    logger = get_run_logger()
    worker = os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname()
    logger.info("chain %s of commit %s on worker %s (host %s)", model, commit[:12], worker, socket.gethostname())
    name = chain_limit(model, commit)
    ensure_limit(name)
    # The slot is leased and renewed while the chain runs: a killed worker's slot frees itself after LEASE_S.
    with (
        concurrency(name, occupy=1, strict=True, lease_duration=LEASE_S),
        chain_workspace(repo, commit, worker) as (workspace, how),
    ):
        logger.info("workspace %s: %s", workspace, how)
        label_run(model, worker, how)
        env = dvc_env(workspace, run_id)
        add_remote(workspace, remote)
        warm_env = kept_warm_server(workspace, env)  # each stage forks from it; it serves this workspace's next chains
        output = command(["dvc", "repro", "--pull", *chain_targets(model)], workspace, {**env, **warm_env})
        logger.info("dvc repro --pull:\n%s", output[-3000:])
        command(["dvc", "push", "--run-cache", *chain_targets(model)], workspace, env)
    ran, restored = ran_stages(output), restored_stages(output)
    return {"ran": ran, "restored": [s for s in chain_targets(model) if s in restored]}


# --- the coordinator ----------------------------------------------------------------------------


@task(cache_policy=NO_CACHE, task_run_name="{what}")
def on_pool(what: str, deployment: str, parameters: dict[str, Any], tags: list[str]) -> State:
    """Start a run of `deployment` on its work pool as a subflow of this run and wait for it to end;
    `what` (e.g. "chain logreg") names it in the task run and the outcome."""
    child: FlowRun = run_deployment(  # type: ignore[assignment]  # called from sync code: a FlowRun, not a coroutine
        deployment, parameters=parameters, timeout=None, poll_interval=POLL_S, tags=tags, as_subflow=True
    )
    if child.state is None or not child.state.is_completed():
        state = child.state.name if child.state else "no state"
        message = child.state.message if child.state else ""
        return Failed(message=f"{what} ended {state}: {message} (flow run {child.name})")
    return Completed(message=f"{what} done (flow run {child.name})")


def restore_chain(root: Path, model: str, run_id: str) -> list[str]:
    """`dvc repro --pull` of `model`'s chain in `root`: the chain stages that ran instead of being restored."""
    output = command(["dvc", "repro", "--pull", *chain_targets(model)], root, dvc_env(root, run_id))
    get_run_logger().info("restoring chain %s: dvc repro --pull\n%s", model, output.strip())
    return [stage for stage in ran_stages(output) if stage in chain_targets(model)]


@flow(name="pipeline-fanout")
def fanout_flow(pool: str, root: str = ".") -> dict[str, str] | State:
    """The whole pipeline with each stale model chain on a Prefect work pool, through the DVC remote.

    Args:
        pool: the work pool; its chain deployment (model-chain/<pool>) was registered by `mnist deploy`
        root: the coordinator's workspace (a clone of the project at a pushed commit)
    """
    from pipeline.config import load_params

    logger = get_run_logger()
    path = Path(root).resolve()
    run_id = os.environ.get(RUN_ID_ENV) or f"fanout-{flow_run.get_name()}"
    commit, origin = pushed_commit(path)
    remote = default_remote(path)
    deployment = check_deployment(pool)
    env = dvc_env(path, run_id)
    start = time.perf_counter()
    command(["dvc", "repro", "--pull", "preprocess"], path, env)
    command(["dvc", "push", "--run-cache"], path, env)
    logger.info("fetch and preprocess ready and pushed in %.1f s", time.perf_counter() - start)
    kept_warm_server(path, env, timeout_s=0)  # started, not waited for: ready when the report and publish fork from it

    load_params(path / "params.yaml")  # a bad params.yaml stops here, named
    models = list(yaml.safe_load((path / "params.yaml").read_text())["models"])
    stale = stale_models(path, models)
    logger.info(
        "commit %s: %d of %d chains to run on the pool: %s", commit[:12], len(stale), len(models), ", ".join(stale) or "none"
    )
    parameters = {"repo": origin, "commit": commit, "remote": remote, "run_id": run_id}
    futures = {
        on_pool.submit(f"chain {m}", deployment, {"model": m, **parameters}, [run_tag(run_id), f"model:{m}"]): m for m in stale
    }
    outcome = {m: "up to date" for m in models if m not in stale}
    failed: dict[str, str] = {}
    for future in as_completed(list(futures)):  # each chain restored as it ends, while the others run
        model = futures[future]
        future.wait()  # done already; this sets its final state
        if not future.state.is_completed():
            failed[model] = future.state.message or future.state.name  # type: ignore[assignment]  # Prefect names every state
        elif ran := restore_chain(path, model, run_id):
            failed[model] = f"ran on the coordinator instead of being restored from the run-cache: {', '.join(ran)}"
        else:
            outcome[model] = "restored"
    for model, why in failed.items():
        outcome[model] = "failed"
        logger.error("chain %s failed: %s", model, why)

    # --single-item: every chain is restored by now, and nothing upstream may run here.
    report = ""
    if not failed:
        report = command(["dvc", "repro", "--single-item", "report", "publish"], path, {**env, **warm.kept_server(path, env)})
    command(["dvc", "push", "--run-cache"], path, env)
    logger.info("report: %s; dvc.lock is ready to commit", "done" if report else "not run (a chain failed)")
    if failed:
        return Failed(message="; ".join(f"{m}: {why.splitlines()[0]}" for m, why in failed.items()))
    return outcome


# --- registering the chain deployment, and the command line -------------------------------------


# What `mnist deploy` registers on a pool: each flow's name and entry point (pipeline/sweep.py's for DVC experiments)
DEPLOYED_FLOWS = {CHAIN_FLOW: "pipeline/fanout.py:chain_flow", "dvc-experiment": "pipeline/sweep.py:experiment_flow"}


def deploy(pool: str, repo: str, zombie_after_s: int = ZOMBIE_AFTER_S) -> list[str]:
    """Register each of DEPLOYED_FLOWS as the deployment <flow>/<pool>, its code cloned from `repo` by each
    flow run; create `pool` as a process work pool if it does not exist. Returns the deployments' names."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.runner.storage import GitRepository

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
    repo = refuse_credentials(repo, "git repository")  # it becomes the deployment's pull step, stored on the server
    deployment_ids = []
    for entrypoint in DEPLOYED_FLOWS.values():
        source = flow.from_source(source=GitRepository(url=repo), entrypoint=entrypoint)
        deployment_ids.append(
            source.deploy(  # type: ignore[union-attr]  # called from sync code: a Flow, not a coroutine
                name=pool,
                work_pool_name=pool,
                build=False,
                push=False,
                print_next_steps=False,
                ignore_warnings=True,
                job_variables={"env": {HEARTBEAT_ENV: str(HEARTBEAT_S)}},
            )
        )
    ensure_zombie_automation(pool, deployment_ids, zombie_after_s)
    return [f"{name}/{pool}" for name in DEPLOYED_FLOWS]


def ensure_zombie_automation(pool: str, deployment_ids: list[object], after_s: int) -> None:
    """Prefect's answer to a worker that dies mid-run: the pool's flow runs send a heartbeat every HEARTBEAT_S,
    and this automation marks a run of its deployments Crashed when none came for `after_s` (one
    automation per pool, replaced by each `mnist deploy`). The server's own Pending and Running
    events start the clock too, so a worker killed before its run's first heartbeat reached the
    server is caught as well."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    name = f"{ZOMBIE_AUTOMATION}-{pool}"
    try:
        Automation.read(name=name).delete()  # type: ignore[attr-defined]  # called from sync code: an Automation, not a coroutine
    except ValueError:  # not there yet
        pass
    Automation(
        name=name,
        description=f"Marks a flow run of pool {pool} Crashed when its worker stops sending heartbeats.",
        trigger=EventTrigger(
            after={"prefect.flow-run.Pending", "prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.Running",
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match_related={
                "prefect.resource.role": "deployment",
                "prefect.resource.id": [f"prefect.deployment.{d}" for d in deployment_ids],
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                force=True,
                message=f"no heartbeat for {after_s} s: the worker running this flow run stopped or was killed",
            )
        ],
    ).create()


def run_once(pool_flow: Any, pool: str, run_prefix: str) -> None:
    """`pool_flow(pool, root=".")` once (the fan-out's or the sweep's coordinator flow), tagged with the run
    ($PIPELINE_RUN_ID, else <run_prefix>-<time>); exits 0 if it completed, else 1 after its message."""
    logging.getLogger("prefect.flow_runs").addFilter(HidePipelineTracebacks())
    run_id = os.environ.setdefault(RUN_ID_ENV, time.strftime(f"{run_prefix}-%Y%m%d-%H%M%S"))
    state = pool_flow.with_options(on_running=[record_run([run_tag(run_id)])])(pool, root=".", return_state=True)
    if not state.is_completed():
        print(f"error: {state.message}", flush=True)
    raise SystemExit(0 if state.is_completed() else 1)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.fanout POOL`: the fan-out flow once, tagged with the pipeline run."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", help="the Prefect work pool whose workers run the chains")
    run_once(fanout_flow, parser.parse_args(argv).pool, "fanout")


if __name__ == "__main__":
    main()
