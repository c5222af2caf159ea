"""What every stage entry point shares: check Prefect, load params once, run the stage's flow.

A user mistake (PipelineError) ends the stage with its one-paragraph message and exit
status 1, never a traceback. The flow run is named `<stage>-<model>` and tagged with the
stage, the model and the pipeline run id, so all runs of one `dvc repro` (or of one DVC
experiment) group together.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import httpx
from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)
from pydantic import ValidationError

from pipeline import localserver, warm
from pipeline.config import ModelParams, load_params
from pipeline.data import is_disk_full
from pipeline.errors import PipelineError


def check_prefect_settings() -> None:
    """Raise PipelineError naming the setting if Prefect cannot read its settings (a bad PREFECT_* variable)."""
    try:
        get_current_settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))} = {e['input']!r}: {e['msg']}" for e in exc.errors())
        raise PipelineError(
            f"Prefect cannot read its settings ({exc.title}: {problems}). Fix or unset the PREFECT_* "
            "environment variable of that name (or the entry of your Prefect profile, `prefect config view`)."
        ) from None


# Importing Prefect's flow machinery with a bad PREFECT_* variable raises a long pydantic
# traceback. Every stage imports this module before Prefect's flows (see stages/*.py), so the
# setting is named here, in one paragraph, and the stage stops before it writes anything.
try:
    check_prefect_settings()
except PipelineError as _exc:
    print(f"\nerror: {_exc}", file=sys.stderr)
    sys.exit(1)

from prefect import (  # noqa: E402 - only once the settings are known to be readable
    Flow,
    State,
    flow as flow_decorator,
    task,
)
from prefect.cache_policies import NO_CACHE  # noqa: E402 - as above
from prefect.client.orchestration import get_client  # noqa: E402 - as above
from prefect.client.schemas.filters import (  # noqa: E402 - as above
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
)
from prefect.logging.loggers import flow_run_logger  # noqa: E402 - as above
from prefect.states import Completed, Failed, Running  # noqa: E402 - as above

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas.objects import FlowRun
    from prefect.flows import FlowStateHook
    from prefect.settings.legacy import Setting

P = ParamSpec("P")
R = TypeVar("R")

START_UP_LOG = "stage process ready in %.2f s (%s start, pipeline/warm.py), launched by DVC at %s"  # for people reading the log
# The same, as the flow run's labels: seconds from launch to ready, "warm" or "cold", and the launch time (ISO 8601)
START_UP_LABELS = ("mnist.start_up_s", "mnist.start", "mnist.launched_at")
RUN_ID_ENV = warm.RUN_ID_ENV  # set by a run command; else the id comes from the experiment or the dvc repro (pipeline_run_id)
PARENT_ENV = "PIPELINE_PARENT_FLOW_RUN"  # the id of the flow run of the whole pipeline run (`mnist run` sets it)
EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` (and queued experiments) for every stage process
SERVER_WAIT_S = 30.0  # how long a stage waits for a Prefect server that refuses connections (a restart takes ~10 s)
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
# Where `make dashboards` serves Prefect (and `mnist run` its server) and TensorBoard: pipeline/servers.py's
# default ports, repeated here because no stage imports servers.py (its changes re-run no stage);
# tests/test_prefect.py checks that they agree. $MNIST_PREFECT_PORT moves the Prefect one (local_api_url).
DASHBOARDS_API_URL = "http://127.0.0.1:4200/api"
KEEPER_START_S = 120.0  # how long the first stage of a bare `dvc repro` waits for the Prefect server it starts
TENSORBOARD_URL = "http://127.0.0.1:6006"  # the link artifacts point here

logging.getLogger("pipeline").setLevel(logging.INFO)


def pipeline_run_id() -> str:
    """The id shared by every stage of one pipeline run: set by the run command, else the DVC
    experiment's name (`exp-<name>`), else that of the `dvc repro` that launched the stage
    (`repro-<its start time>-<its PID>`), else a fresh one (a stage run by hand)."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    if os.environ.get(EXPERIMENT_ENV):
        return f"exp-{os.environ[EXPERIMENT_ENV]}"
    launcher_parent = os.environ.get(warm.LAUNCHED_BY_ENV, "")
    if launcher_parent.isdigit():
        import psutil

        try:
            started = psutil.Process(int(launcher_parent)).create_time()
            return time.strftime("repro-%Y%m%d-%H%M%S", time.localtime(started)) + f"-{launcher_parent}"
        except psutil.Error:
            pass
    return time.strftime("manual-%Y%m%d-%H%M%S")


def stage_labels(stage: str, model: str | None) -> list[str]:
    """The tags of a stage's flow run: the stage, the pipeline run, the model and the DVC experiment, where there is one."""
    labels = [f"stage:{stage}", run_tag(pipeline_run_id())]
    if model:
        labels.append(f"model:{model}")
    if os.environ.get(EXPERIMENT_ENV):
        labels.append(f"experiment:{os.environ[EXPERIMENT_ENV]}")
    return labels


def run_tag(run_id: str) -> str:
    """The Prefect tag that every flow run of one pipeline run carries."""
    return f"pipeline-run:{run_id}"


def prefect_settings() -> dict[Setting, Any]:
    """Prefect setting overrides for a stage's flow run: heartbeats off, unless the user set them.

    The heartbeat thread sleeps in 1 s steps and the flow waits for it at its end, so they
    cost a stage up to a second. They only help together with an automation that marks runs
    without heartbeats as crashed; set PREFECT_FLOWS_HEARTBEAT_FREQUENCY to have them.
    """
    return {} if HEARTBEAT_ENV in os.environ else {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def check_prefect_api(timeout_s: float = 3.0, wait_s: float = SERVER_WAIT_S) -> str | None:
    """The configured Prefect API URL if it answers; None if none is configured.

    A server that refuses connections is waited for up to `wait_s` (it may be restarting:
    `mnist run` and `mnist dashboards` start theirs again when it dies); one that accepts but
    does not answer within `timeout_s`, or still refuses after the wait, stops the stage before
    any work, rather than letting Prefect hang or silently drop the run's records. Prefect
    settings it cannot read (a bad PREFECT_* variable) stop it too, with the setting named.
    """
    check_prefect_settings()
    url: str | None = PREFECT_API_URL.value()
    if not url:
        return None
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            httpx.get(url.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except httpx.ConnectError as exc:  # refused: the server may be restarting
            if time.monotonic() < deadline:
                if not waited:
                    print(
                        f"The Prefect server at {url} refuses connections; waiting up to {wait_s:.0f} s for it "
                        "(it may be restarting).",
                        file=sys.stderr,
                        flush=True,
                    )
                    waited = True
                time.sleep(0.5)
                continue
            error: httpx.HTTPError = exc
        except httpx.HTTPError as exc:
            error = exc
        else:
            if waited:
                print(f"The Prefect server at {url} answers again.", file=sys.stderr, flush=True)
            return url
        still = f"; still refused after {wait_s:.0f} s" if waited else ""
        raise PipelineError(
            f"The Prefect server at PREFECT_API_URL={url} does not answer ({type(error).__name__}: {error}{still}). "
            "Start it with `make dashboards` (or `prefect server start`), or unset PREFECT_API_URL "
            "to run the stage with a temporary local server."
        ) from None


def local_api_url() -> str:
    """The API URL of the project's own Prefect server on this machine: DASHBOARDS_API_URL, or on $MNIST_PREFECT_PORT."""
    if os.environ.get(localserver.PORT_ENV):
        return f"http://127.0.0.1:{localserver.port()}/api"
    return DASHBOARDS_API_URL


_local_auth: str | None = None  # the auth string of the project's server a stage found (client_settings sends it)


def dashboards_api(timeout_s: float = 2.0, url: str | None = None) -> str | None:
    """`url` (default local_api_url()) if this project's Prefect server answers there (`make dashboards`, or
    one a bare `dvc repro` started, on this machine: pipeline/localserver.py), its auth string noted for
    client_settings; else None. A server there that is not the project's gets nothing (a note says what answered)."""
    url = url or local_api_url()
    found = _project_server(url, timeout_s)
    return url if found else None


def _project_server(url: str, timeout_s: float) -> bool | None:
    """True if the project's server answers at `url` (its auth string then in _local_auth); None if something
    else answers there (said in a note); False if nothing does."""
    global _local_auth
    port = urlsplit(url).port or 80
    try:
        answer = httpx.get(url + "/health", timeout=timeout_s)  # it carries no credential
        healthy = answer.status_code == 200 and answer.json() is True
    except (httpx.HTTPError, ValueError):
        return False
    record = localserver.ours(port) if healthy else None  # once it answers: a server starting may not listen before
    if healthy and record is None:
        print(
            f"Prefect: {url} answers but is not a server this project started "
            f"({localserver.describe_listener(port)}); this stage reports to a temporary server instead.",
            file=sys.stderr,
            flush=True,
        )
        return None
    if healthy and record is not None:
        _local_auth = record.auth
    return healthy


def may_start_servers() -> bool:
    """True for a stage of a bare `dvc repro`, `dvc exp run` or queued experiment: launched by dvc.yaml's
    command (pipeline/warm.py), with no run command around it, and background servers not turned off
    ($MNIST_SERVERS_IDLE_S=0)."""
    return warm.launched() is not None and not os.environ.get(RUN_ID_ENV) and localserver.idle_s() > 0


_users_fd: int | None = None  # this stage's shared lock on the users file of the project's server, held to its end


def use_local_server(port: int) -> None:
    """Hold a shared flock on the users file of `port` for the rest of this process, and touch the file:
    the background server there does not stop while a stage uses it, and counts its idle time from the last
    one (pipeline/servers.py wait_idle). Waits while that server is stopping."""
    global _users_fd
    if _users_fd is not None:
        return
    import fcntl

    path = localserver.users_path(port)
    _users_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(_users_fd, fcntl.LOCK_SH)
    os.utime(path)


def start_keeper(url: str) -> str | None:
    """Start the project's Prefect server on `url`'s port in the background (`python -m pipeline.servers keep`,
    detached from DVC, stopped after localserver.idle_s() without a stage); `url` once it answers, else None
    (said in a note: the stage then reports to a temporary server)."""
    import subprocess

    port = urlsplit(url).port or localserver.DEFAULT_PORT
    folder = localserver.folder()
    package = Path(localserver.__file__).resolve().parent.parent  # the keeper runs this project's code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package), os.environ.get("PYTHONPATH")]))}
    for name in ("PREFECT_API_URL", localserver.CLIENT_AUTH_ENV, warm.SOCKET_ENV):
        env.pop(name, None)
    log = folder / f"{port}.keeper.log"
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "pipeline.servers", "keep", str(port), str(localserver.idle_s())],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in DVC's process group, and not ended with it
        )
    deadline = time.monotonic() + KEEPER_START_S
    while time.monotonic() < deadline:
        found = _project_server(url, 2.0)
        if found:
            return url
        code = keeper.poll()
        if found is None or code not in (None, 3):  # 3: another one started it (pipeline.servers.KEEPER_EXIT_RUNNING)
            break
        time.sleep(0.5)
    else:
        keeper.terminate()
    print(
        f"Prefect: could not start the project's server on 127.0.0.1:{port} (see {log}); "
        "this stage reports to a temporary server instead.",
        file=sys.stderr,
        flush=True,
    )
    return None


def reporting_api() -> str | None:
    """The Prefect API a stage's flow run reports to: PREFECT_API_URL where it is set (and answers, see
    check_prefect_api); else the project's server on this machine (local_api_url) where it answers, so a bare
    `dvc repro` and every `dvc exp run` or queued experiment show on the dashboard with no setting; else, for
    a stage of one of those (may_start_servers), that server started now in the background, with a warm stage
    server for the project folder, both for this and later runs until localserver.idle_s() passes without a
    stage (`mnist dashboards --stop` stops them now); else None: Prefect's temporary server, whose records end
    with the stage."""
    api = check_prefect_api()
    if api is not None:
        return api
    url = local_api_url()
    if not may_start_servers():
        if api := dashboards_api(url=url):
            print(f"Prefect: reporting to the server of `make dashboards` at {api}.", file=sys.stderr, flush=True)
        return api
    port = urlsplit(url).port or localserver.DEFAULT_PORT
    use_local_server(port)
    started = []
    root = Path.cwd().resolve()
    if warm.SOCKET_ENV not in os.environ and warm.start_background(root, warm.initial_environ(), localserver.idle_s()):
        started.append(f"a warm stage server for {root}")
    found = _project_server(url, 2.0)
    if found is False and (api := start_keeper(url)):
        # not the auth string itself: a stage's output can end up in files (`dvc queue logs` keeps it)
        auth = f" (its UI asks for the auth string in {localserver.folder() / f'{port}.json'})" if _local_auth else ""
        started.insert(0, f"the project's Prefect server on {url.removesuffix('/api')}{auth}")
    elif found:
        api = url
        print(f"Prefect: reporting to the project's server at {api}.", file=sys.stderr, flush=True)
    if started:
        print(
            f"Started in the background, for this and later runs: {' and '.join(started)}; "
            f"{'they stop' if len(started) > 1 else 'it stops'} after {localserver.idle_words(localserver.idle_s())} "
            "without a stage, or now with `mnist dashboards --stop`.",
            file=sys.stderr,
            flush=True,
        )
    return api


def client_settings(api: str | None) -> dict[Setting, Any]:
    """Prefect settings for calls to `api`: its URL, and the auth string that the environment holds for it
    (else that of the project's server the stage found)."""
    if not api:
        return {}
    auth = os.environ.get(localserver.CLIENT_AUTH_ENV) or _local_auth
    return {PREFECT_API_URL: api, **({PREFECT_API_AUTH_STRING: auth} if auth else {})}


@task(name="stage", cache_policy=NO_CACHE)
def stage_slot() -> None:
    """Stands for one stage in the flow run of the pipeline run; the stage's own flow run is its subflow."""


@flow_decorator(name="pipeline-run")
def pipeline_run() -> None:
    """One pipeline run (`mnist run`, a `dvc repro`, a DVC experiment): each stage's flow run nests under its flow run."""


def adopt_parent() -> UUID:
    """The flow run of this stage's pipeline run (pipeline_run_id), made Running; created by the run's first stage.

    For a bare `dvc repro` or a DVC experiment, where no run command made one: the stages of one
    run follow each other, so the first creates it and the others find it by name and tag.
    """
    run_id = pipeline_run_id()
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline-run"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_id])),
        )
        if not found:
            return client.create_flow_run(pipeline_run, name=run_id, state=Running()).id
        if found[0].state is None or found[0].state.is_final():
            client.set_flow_run_state(found[0].id, Running(), force=True)
        return found[0].id


def end_parent(parent: UUID, state: Any, stage: str) -> None:
    """Leave the pipeline run's flow run as the run stands after `stage`: Completed, or Failed naming the stage."""
    ok = not (state.is_failed() or state.is_crashed())
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(parent, Completed() if ok else Failed(message=f"{stage} failed: {state.message}"), force=True)


def run_in_parent(flow: Flow[..., Any], parent: UUID, stage: str, run_name: str, parameters: dict[str, Any]) -> Any:
    """Run `flow` as a subflow of the pipeline run's flow run `parent`; its final state.

    A task run of the parent, named `stage` as DVC names it, stands for the stage, and the stage's flow run is created with that
    task run as its parent, so the Prefect UI shows the whole run as one graph; the server copies
    the stage's state to the task run (its UpdateSubflowParentTask rule). The flow run, created
    here, is then run by Prefect's flow engine in this process, as a deployment's run would be.
    """
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    with get_client(sync_client=True) as client:
        slot = client.create_task_run(
            stage_slot.with_options(name=stage),
            flow_run_id=parent,
            dynamic_key=f"{stage}-{os.getpid()}",
            name=stage,
            state=Pending(),
        )
        flow_run = client.create_flow_run(flow, name=run_name, parameters=parameters, parent_task_run_id=slot.id)
    return run_flow(flow, flow_run=flow_run, parameters=parameters, return_type="state")


def this_process() -> str:
    """`host:pid`, as Prefect's workers record a flow run's process in its infrastructure_pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def record_run(labels: list[str]) -> FlowStateHook[..., Any]:
    """An on_running hook that tags the flow run with `labels` and notes its stage process on it.

    The process (`host:pid`) lets a run whose process is gone be told from one still running
    (pipeline/orphans.py), whoever looks. The tags go on the flow run here rather
    than through `prefect.tags()`, which would tag every task run too: for each tag of a task
    run, Prefect's task engine asks the server for a concurrency slot, a request it does not
    retry, so a server restart during a stage failed the stage (tests/test_faults.py).
    """

    launch, ready = warm.launched(), time.time()  # called before the flow run is created: the process is ready

    def record(flow: Flow[..., Any], flow_run: FlowRun, state: State) -> None:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, infrastructure_pid=this_process(), tags=sorted({*flow_run.tags, *labels}))
        if launch:
            when, how = launch
            launched_at = datetime.fromtimestamp(when, UTC).isoformat()
            with get_client(sync_client=True) as client:  # what benchmarks/breakdown.py reads
                client.update_flow_run_labels(
                    flow_run.id,
                    {START_UP_LABELS[0]: round(ready - when, 3), START_UP_LABELS[1]: how, START_UP_LABELS[2]: launched_at},
                )
            flow_run_logger(flow_run, flow).info(START_UP_LOG, ready - when, how, launched_at)

    return record


class HidePipelineTracebacks(logging.Filter):
    """Prefect logs a failed task's or flow's exception with its traceback; a PipelineError's message says it
    all, and so does a full disk's (the stage then stops with DiskFull, naming the path and the space needed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (isinstance(record.exc_info[1], PipelineError) or is_disk_full(record.exc_info[1])):
            record.exc_info, record.exc_text = None, None
        return True


def as_task(fn: Callable[P, R], name: str, **options: Any) -> Task[P, R]:
    """A Prefect task around a plain library function, named for the dashboard.

    Inputs are arrays and models: never cache or hash them.
    """
    return task(fn, cache_policy=NO_CACHE, task_run_name=name, **options)  # type: ignore[call-overload, no-any-return]  # Prefect accepts task(fn, **options); its overloads do not say so


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "-".join(parts).lower().replace("_", "-")


def parse_arguments(flow: Flow[..., Any], argv: list[str] | None = None) -> dict[str, Any]:
    """The flow's arguments from the command line, as dvc.yaml's command gives them.

    They are read off the flow itself: its `model` parameter is the first word, each Path
    parameter is a required `--name` option, and the help of each is the flow docstring's
    line for it (the same text the Prefect dashboard shows). `params` is not an argument:
    it is params.yaml.
    """
    summary = (flow.description or "").split("\n\n")[0]  # the docstring without its Args section
    parser = argparse.ArgumentParser(prog=f"stages/{flow.name}.py", description=summary)
    for name, spec in flow.parameters.properties.items():
        if name == "params":
            continue
        if spec.get("format") == "path":
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, help=spec.get("description"))
        else:
            parser.add_argument(name, help=spec.get("description"))
    return vars(parser.parse_args(argv))


def run_stage(
    flow: Flow[..., Any], model_types: dict[str, type[ModelParams]] | None = None, argv: list[str] | None = None
) -> None:
    """Run `flow` as the Prefect flow run of the DVC stage of the same name, with the command line's arguments.

    params.yaml is read and validated once, here, with `model_types` (the registry's params
    classes) where the stage uses models; the flow gets it as its `params` argument. The
    checks come first: an unreachable Prefect server or a bad params.yaml stops the stage
    before anything is written.
    """
    stage = flow.name
    arguments = parse_arguments(flow, argv)
    model = arguments.get("model")
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(HidePipelineTracebacks())
    try:
        api = reporting_api()
        params = load_params(model_types=model_types)
        if model is not None:
            params.model(model)  # an unknown model name stops here, before any work
        # TensorFlow and Prefect are loaded now and stay for the whole process. Freezing their
        # objects keeps each later garbage collection from walking them all again.
        gc.freeze()
        run_name = f"{stage}-{model}" if model else stage
        hook = record_run(stage_labels(stage, model))
        with temporary_settings(updates={**prefect_settings(), **client_settings(api)}):
            if api:
                address = f"{stage}@{model}" if model else stage  # as DVC names the stage
                parent, own = (UUID(os.environ[PARENT_ENV]), False) if os.environ.get(PARENT_ENV) else (adopt_parent(), True)
                state = run_in_parent(
                    flow.with_options(on_running=[hook]), parent, address, run_name, {"params": params, **arguments}
                )
                if own:  # no run command ends the parent: each stage leaves it as the run stands after it
                    end_parent(parent, state, address)
            else:  # Prefect's temporary server: nothing to nest under
                state = flow.with_options(flow_run_name=run_name, on_running=[hook])(
                    params=params, **arguments, return_state=True
                )
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
