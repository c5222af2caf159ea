"""Prefect against a real `prefect server start`: stage flow runs, artifacts, the end-to-end flow, a deployment."""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import http.server
import re
import subprocess
import sys
import threading
import time
import uuid
from functools import partial
from itertools import pairwise
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType

from conftest import MIRROR, REPO, SmallRun, copy_project, dvc, edit_params, free_port, project_env
from helpers import silent_server
from pipeline.cli import mark_killed_runs
from pipeline.config import Params
from pipeline.stage import (
    EXPERIMENT_ENV,
    HEARTBEAT_ENV,
    RUN_ID_ENV,
    SERVER_WAIT_S,
    check_prefect_api,
    prefect_settings,
    run_tag,
    stage_labels,
)


def flow_runs(tag: str) -> list:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
        return [(run, client.read_flow(run.flow_id).name) for run in runs]


def task_runs(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def logs_of(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def run_dag(project: Path, run_id: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.dag"],
        cwd=project,
        env=project_env(PIPELINE_RUN_ID=run_id, **env),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_every_stage_is_a_completed_flow_run_with_names_and_tags(small_run: SmallRun) -> None:
    runs = flow_runs(f"pipeline-run:{small_run.run_id}")
    by_name = {run.name: (run, flow) for run, flow in runs}
    expected = {"fetch", "preprocess", "report", "publish"}
    for model in small_run.models():
        expected |= {f"train-{model}", f"evaluate-{model}", f"export-{model}"}
    assert set(by_name) == expected
    for name, (run, flow) in by_name.items():
        assert run.state.type == StateType.COMPLETED, (name, run.state)
        stage, _, model = name.partition("-")
        assert flow == stage
        assert f"stage:{stage}" in run.tags
        if model:
            assert f"model:{model}" in run.tags
    tasks = task_runs(by_name["train-cnn"][0].id)
    assert {"load data", "fit cnn", "save model"} <= set(tasks)
    # Untagged: Prefect asks the server for a concurrency slot per tag of a task run, and does
    # not retry that request while the server restarts (pipeline.stage.record_run).
    assert all(task.tags == [] for task in tasks.values()), {name: task.tags for name, task in tasks.items()}
    tasks = task_runs(by_name["fetch"][0].id)
    assert "fetch train-images-idx3-ubyte" in tasks


def test_artifacts_leaderboard_metrics_progress_and_links(small_run: SmallRun) -> None:
    # The small run's own artifacts: other tests' runs (test_fanout's sequential run) report to this server too.
    ours = ArtifactFilterFlowRunId(any_=[run.id for run, _ in flow_runs(f"pipeline-run:{small_run.run_id}")])
    with get_client(sync_client=True) as client:

        def latest(key: str):
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ours))
            assert found, f"no artifact {key}"
            return found[-1]

        board = latest("leaderboard")
        assert board.type == "table"
        for model in small_run.models():
            assert model in str(board.data)
        assert latest("metrics-cnn").type == "markdown"
        card = latest("card-cnn")
        assert card.type == "markdown" and card.data == (small_run.project / "data/export/cnn/card.md").read_text()
        progress = latest("train-progress-deep-mlp")
        assert progress.type == "progress" and float(progress.data) == 100.0
        link = latest("tensorboard-cnn")  # Prefect stores a link artifact as markdown: [text](url)
        assert "](http://127.0.0.1:6006/" in str(link.data) and "train/cnn" in str(link.data)


def test_end_to_end_flow_reports_ran_and_up_to_date(small_run: SmallRun) -> None:
    project = small_run.project
    before = (project / "params.yaml").read_text()
    edit_params(project, lambda raw: raw["gates"].update(linear=0.998) or raw)  # evaluate@linear is now stale
    try:
        run_id = f"flow-{int(time.time())}"
        done = run_dag(project, run_id)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        [(flow_run, _)] = [(r, f) for r, f in flow_runs(f"pipeline-run:{run_id}") if f == "pipeline"]
        assert flow_run.state.type == StateType.COMPLETED
        tasks = task_runs(flow_run.id)
        ran = {"evaluate@linear", "export@linear", "report", "publish"}  # publish: the linear export record changed
        assert set(tasks) >= ran | {"fetch", "train@cnn"}
        for name, task in tasks.items():
            assert task.state.type == StateType.COMPLETED, (name, task.state)
            assert task.state.message == ("ran" if name in ran else "up to date"), (name, task.state.message)
        logs = logs_of(flow_run.id)  # a line per stage as it ends: position, outcome, seconds
        assert re.search(rf"\[\d+/{len(tasks)}\] evaluate@linear: ran, [\d.]+ s", logs), logs[-3000:]
        assert re.search(rf"\[1/{len(tasks)}\] fetch: up to date, [\d.]+ s", logs), logs[-3000:]
        assert dvc(project, "status", "--json").stdout.strip() == "{}"
    finally:
        (project / "params.yaml").write_text(before)
        dvc(project, "repro")


class _CorruptHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.pipeline
def test_failing_stage_fails_its_flow_run_and_the_rest_is_not_run(tmp_path: Path) -> None:
    """A mirror that serves a corrupted file: fetch fails with the reason in its logs; nothing after it runs."""
    served = tmp_path / "mirror"
    served.mkdir()
    for gz in MIRROR.glob("*-ubyte.gz"):
        data = bytearray(gzip.decompress(gz.read_bytes()))
        data[-1] ^= 0xFF  # one byte changed
        (served / gz.name).write_bytes(gzip.compress(bytes(data)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_CorruptHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        project = copy_project(tmp_path / "project")
        url = f"http://127.0.0.1:{server.server_address[1]}/"

        def bad_mirror(raw: dict) -> dict:
            raw["fetch"].update(mirrors=[url], retries=0, backoff_s=0.0)
            return raw

        edit_params(project, bad_mirror)
        run_id = f"fail-{int(time.time())}"
        env = {k: v for k, v in project_env(PIPELINE_RUN_ID=run_id).items() if k != "MNIST_MIRROR"}
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.dag"], cwd=project, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 1
    finally:
        server.shutdown()
    runs = {flow: run for run, flow in flow_runs(f"pipeline-run:{run_id}")}
    assert runs["pipeline"].state.type == StateType.FAILED
    assert runs["fetch"].state.type == StateType.FAILED
    assert "failed verification" in logs_of(runs["fetch"].id)
    assert set(runs) == {"pipeline", "fetch"}  # no other stage started
    tasks = task_runs(runs["pipeline"].id)
    assert tasks["fetch"].state.type == StateType.FAILED
    others = [t for name, t in tasks.items() if name != "fetch"]
    assert others and all(t.state.name == "Not run" for t in others)
    assert not (project / "data" / "raw" / "train-images-idx3-ubyte").exists()


@pytest.mark.pipeline
def test_a_killed_stage_shows_as_crashed_after_the_run(tmp_path: Path) -> None:
    """SIGKILL leaves a stage no chance to report; the run command's sweep marks its flow run Crashed."""
    project = copy_project(tmp_path / "project")
    run_id = f"killed-{time.time_ns()}"
    env = {k: v for k, v in project_env(PIPELINE_RUN_ID=run_id).items() if k != "MNIST_MIRROR"}
    with silent_server() as url:  # fetch waits on it, its flow run Running
        edit_params(project, lambda raw: {**raw, "fetch": {**raw["fetch"], "mirrors": [url], "timeout_s": 120, "retries": 0}})
        stage = subprocess.Popen(
            [sys.executable, "stages/fetch.py", "--out", "data/raw", "--tensorboard", "tb"],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while not [r for r, _ in flow_runs(f"pipeline-run:{run_id}") if r.state.type == StateType.RUNNING]:
                assert stage.poll() is None and time.monotonic() < deadline, "the fetch flow run never started"
                time.sleep(0.5)
        finally:
            stage.kill()
            stage.wait()
    [(run, _)] = flow_runs(f"pipeline-run:{run_id}")
    assert run.state.type == StateType.RUNNING  # what the dashboard would show forever

    assert mark_killed_runs(run_id) == ["fetch"]
    [(run, _)] = flow_runs(f"pipeline-run:{run_id}")
    assert run.state.type == StateType.CRASHED
    assert "killed" in run.state.message
    assert mark_killed_runs(run_id) == []  # finished runs are left alone


def test_heartbeats_are_off_unless_the_user_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    monkeypatch.delenv(HEARTBEAT_ENV, raising=False)
    assert prefect_settings() == {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    monkeypatch.setenv(HEARTBEAT_ENV, "60")
    assert prefect_settings() == {}


@pytest.mark.services
@pytest.mark.parametrize("server", ["closed port", "silent server"])
def test_an_unreachable_prefect_server_stops_the_stage_before_any_work(tmp_path: Path, server: str) -> None:
    """PREFECT_API_URL set, nothing answering there: a clear message (after waiting SERVER_WAIT_S for a
    server that refuses connections, as a restarting one does), not a hang, nothing written."""
    from helpers import closed_port_url

    with contextlib.ExitStack() as stack:
        url = closed_port_url() if server == "closed port" else stack.enter_context(silent_server())
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(REPO / "stages" / "fetch.py"), "--out", "raw", "--tensorboard", "tb"],
            cwd=tmp_path,
            env=project_env(PREFECT_API_URL=url + "api"),
            capture_output=True,
            text=True,
            timeout=SERVER_WAIT_S + 90,  # a hang fails here
        )
        print(f"{server}: stopped after {time.monotonic() - start:.1f} s")
    assert done.returncode == 1
    assert "does not answer" in done.stderr and "make dashboards" in done.stderr, done.stderr
    if server == "closed port":
        assert "refuses connections; waiting up to" in done.stderr and "still refused after" in done.stderr, done.stderr
    else:
        assert "waiting" not in done.stderr, done.stderr  # a silent server is not waited for: it stops at the timeout
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_stage_waits_for_a_prefect_server_that_comes_back(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that refuses connections while it restarts: the start-up check waits for it instead of failing."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from helpers import closed_port_url

    url = closed_port_url()
    port = int(url.rstrip("/").rsplit(":", 1)[1])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args) -> None:
            pass

    result: list[str | None] = []
    with temporary_settings(updates={PREFECT_API_URL: url + "api"}):
        settings = contextvars.copy_context()  # Prefect's settings live in a context variable, which threads do not inherit
        check = threading.Thread(target=lambda: result.append(settings.run(check_prefect_api, wait_s=120)), daemon=True)
        check.start()
        said = ""
        deadline = time.monotonic() + 60
        while "refuses connections" not in said:  # the server comes back once the check says it waits
            assert check.is_alive() and time.monotonic() < deadline, said
            said += capsys.readouterr().err
            time.sleep(0.1)
        server = http.server.HTTPServer(("127.0.0.1", port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            check.join(timeout=60)
        finally:
            server.shutdown()
            server.server_close()
    said += capsys.readouterr().err
    assert result == [url + "api"], said
    assert "answers again" in said, said


def test_the_stages_dashboards_urls_are_the_servers_default_ports() -> None:
    """stage.py repeats servers.py's ports (no stage imports servers.py): they must agree."""
    from pipeline import servers, stage

    assert stage.DASHBOARDS_API_URL == f"http://127.0.0.1:{servers.PREFECT_PORT}/api"
    assert stage.TENSORBOARD_URL == f"http://127.0.0.1:{servers.TENSORBOARD_PORT}"


def test_without_prefect_api_url_a_stage_reports_to_the_dashboards_server_if_one_answers(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With PREFECT_API_URL unset, a stage (here a one-task flow through run_stage) reports to the
    server at DASHBOARDS_API_URL, here pointed at the session's server; with none there, to Prefect's
    temporary server (reporting_api None); a server that accepts but does not answer is not used."""
    from prefect import flow
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from helpers import closed_port_url
    from pipeline import stage

    marker = f"dashboards-{uuid.uuid4().hex[:8]}"

    @flow(name="probe")
    def probe(params: Params) -> None:
        """A flow with the stages' signature that does nothing."""

    monkeypatch.chdir(REPO)  # run_stage reads params.yaml from the working directory
    monkeypatch.setenv(RUN_ID_ENV, marker)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        monkeypatch.setattr(stage, "DASHBOARDS_API_URL", closed_port_url() + "api")
        assert stage.reporting_api() is None
        with silent_server() as silent:
            monkeypatch.setattr(stage, "DASHBOARDS_API_URL", silent + "api")
            assert stage.dashboards_api(timeout_s=0.5) is None
        monkeypatch.setattr(stage, "DASHBOARDS_API_URL", prefect_api)
        assert stage.reporting_api() == prefect_api
        stage.run_stage(probe, argv=[])
        APILogWorker.drain_all(timeout=30)  # now, while the server is up, rather than at exit after the session stopped it
    assert f"reporting to the server of `make dashboards` at {prefect_api}" in capsys.readouterr().err
    ((run, name),) = flow_runs(run_tag(marker))
    assert (name, run.name, run.state_name) == ("probe", "probe", "Completed")


def test_a_dvc_experiment_names_the_pipeline_run_and_tags_its_flow_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    monkeypatch.setenv(EXPERIMENT_ENV, "lr-0.002")
    assert stage_labels("train", "cnn") == ["stage:train", "pipeline-run:exp-lr-0.002", "model:cnn", "experiment:lr-0.002"]
    monkeypatch.setenv(RUN_ID_ENV, "run-7")  # the run command's id wins, so mnist run inside an experiment stays one run
    assert stage_labels("report", None) == ["stage:report", "pipeline-run:run-7", "experiment:lr-0.002"]
    monkeypatch.delenv(EXPERIMENT_ENV)
    assert stage_labels("fetch", None) == ["stage:fetch", "pipeline-run:run-7"]


def test_a_bad_prefect_setting_stops_the_stage_with_its_name(tmp_path: Path) -> None:
    env = project_env(**{HEARTBEAT_ENV: "10"})  # Prefect wants at least 30
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / "fetch.py"), "--out", "raw", "--tensorboard", "tb"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "heartbeat_frequency = '10'" in done.stderr and "PREFECT_*" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_deployment_triggered_through_the_api_completes(small_run: SmallRun, tmp_path: Path) -> None:
    from prefect.deployments import run_deployment

    env = project_env(PREFECT_RUNNER_POLL_FREQUENCY="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.dag", "--serve", "--name", "test", "--cron", ""],
        cwd=small_run.project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name("pipeline/test")
                    break
                except Exception:  # noqa: BLE001 - not there yet, whatever the client raises: the deadline ends the wait
                    if time.monotonic() > deadline or server.poll() is not None:
                        pytest.fail("the deployment never appeared")
                    time.sleep(1)
        flow_run = run_deployment("pipeline/test", timeout=600)
        assert flow_run.state.type == StateType.COMPLETED, flow_run.state
        # whoever reaches the server cannot point the deployment at a folder of theirs
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "dvc.yaml").write_text("stages:\n  x:\n    cmd: touch ran-here\n")
        subprocess.run(["git", "init", "-q"], cwd=elsewhere, check=True)
        subprocess.run(["dvc", "init", "-q"], cwd=elsewhere, env=env, check=True)
        refused = run_deployment("pipeline/test", parameters={"root": str(elsewhere)}, timeout=600)
        assert refused.state.type == StateType.FAILED and "refused" in refused.state.message, refused.state
        assert not (elsewhere / "ran-here").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def start_dashboards(tmp_path: Path, **extra_env: str) -> tuple[subprocess.Popen, int, int]:
    """`mnist dashboards` on two free ports, in an empty project, with its own PREFECT_HOME; output piped."""
    project = tmp_path / "project"
    (project / "data" / "tensorboard").mkdir(parents=True)
    prefect_port, tensorboard_port = free_port(), free_port()
    env = project_env(PREFECT_HOME=str(tmp_path / "prefect-home"), **extra_env)
    env.pop("PREFECT_API_URL", None)
    command = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "dashboards",
            "--prefect-port",
            str(prefect_port),
            "--tensorboard-port",
            str(tensorboard_port),
        ],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return command, prefect_port, tensorboard_port


@pytest.mark.services
@pytest.mark.parametrize("auth", ["", "mnist:a-long-secret"], ids=["open", "basic auth"])
def test_dashboards_command_starts_both_on_loopback_and_stops_both(tmp_path: Path, auth: str) -> None:
    """`mnist dashboards`: a Prefect server and TensorBoard, bound to 127.0.0.1; SIGTERM stops both.
    The server asks for an auth string (the user's, or a random one shown once), and the command's
    own calls (the check for orphaned runs) send it."""
    import psutil

    from pipeline.servers import AUTH_ENV, answers

    command, prefect_port, tensorboard_port = start_dashboards(tmp_path, **({AUTH_ENV: auth} if auth else {}))
    urls = [f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{tensorboard_port}/data/logdir"]
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(command.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not (any("Ctrl-C stops both" in line for line in lines) and all(answers(url) for url in urls)):
            assert command.poll() is None and time.monotonic() < deadline, "the dashboards did not start"
            time.sleep(0.5)
        listening = {
            conn.laddr
            for proc in psutil.Process(command.pid).children(recursive=True)
            for conn in proc.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN
        }
        assert {("127.0.0.1", prefect_port), ("127.0.0.1", tensorboard_port)} <= {(a.ip, a.port) for a in listening}
        assert all(a.ip == "127.0.0.1" for a in listening), listening
    finally:
        command.terminate()
        command.wait(timeout=60)
        reader.join(timeout=10)
    output = "".join(lines)
    assert command.returncode == 0, output
    assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in output
    assert "could not check for orphaned" not in output, output
    assert "PREFECT_API_AUTH_STRING=" in output, output  # the server asks for one either way
    assert ("its UI asks for this auth string: mnist:" in output) == (not auth), output  # a random one is shown once
    assert not any(answers(url, timeout_s=1.0) for url in urls)


@pytest.mark.services
def test_dashboards_sigterm_during_start_up_leaves_no_server(tmp_path: Path) -> None:
    """SIGTERM as soon as the Prefect server answers, TensorBoard perhaps not yet: exit 0, both ports closed, no child left."""
    import psutil

    from pipeline.servers import answers

    command, prefect_port, tensorboard_port = start_dashboards(tmp_path)
    prefect_url = f"http://127.0.0.1:{prefect_port}/api/health"
    children: list = []
    try:
        deadline = time.monotonic() + 120
        while not answers(prefect_url):
            assert command.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
            children = psutil.Process(command.pid).children(recursive=True)
            time.sleep(0.2)
        children = psutil.Process(command.pid).children(recursive=True)
    finally:
        command.terminate()
        output, _ = command.communicate(timeout=60)
    assert command.returncode == 0, output
    assert children, "no server process was seen"
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {alive}"
    assert not answers(prefect_url, timeout_s=1.0)
    assert not answers(f"http://127.0.0.1:{tensorboard_port}/data/logdir", timeout_s=1.0)


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.services
@pytest.mark.parametrize("moment", ["a server process exists", "both answer, then SIGTERM twice"])
def test_dashboards_sigterm_at_another_moment_leaves_no_server(tmp_path: Path, moment: str) -> None:
    """SIGTERM before anything answers, and a second SIGTERM in the middle of shut-down: exit 0, no child left."""
    import psutil

    from pipeline.servers import answers

    command, prefect_port, tensorboard_port = start_dashboards(tmp_path)
    urls = [f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{tensorboard_port}/data/logdir"]
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 180
        while True:
            seen.update((p.pid, p) for p in descendants(command.pid))
            ready = bool(seen) if moment == "a server process exists" else all(answers(url) for url in urls)
            if ready:
                break
            assert command.poll() is None and time.monotonic() < deadline, f"never reached: {moment}"
            time.sleep(0.2)
        command.terminate()
        if moment != "a server process exists":
            while command.poll() is None and not any(not p.is_running() for p in seen.values()):
                time.sleep(0.05)  # shut-down has begun: a server is gone
            command.terminate()
    finally:
        output, _ = command.communicate(timeout=90)
    assert command.returncode == 0, output
    assert "stopped." in output, output
    _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
    assert not alive, f"left running: {alive}"
    assert not any(answers(url, timeout_s=1.0) for url in urls)


@pytest.mark.services
def test_dashboards_killed_outright_take_their_servers_with_them(tmp_path: Path) -> None:
    """SIGKILL gives the command no clean-up at all: the kernel stops its servers (parent-death signal)."""
    import psutil

    from pipeline.servers import answers

    command, prefect_port, _ = start_dashboards(tmp_path)
    url = f"http://127.0.0.1:{prefect_port}/api/health"
    deadline = time.monotonic() + 180
    while not answers(url):
        assert command.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
        time.sleep(0.5)
    children = descendants(command.pid)
    command.kill()
    command.communicate(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"left running: {alive}"
    assert not answers(url, timeout_s=1.0)


@pytest.mark.pipeline
def test_sigterm_to_the_run_command_alone_stops_dvc_and_its_stage(tmp_path: Path) -> None:
    """`kill PID` of `mnist run`: dvc and the running stage stop too, the stage's flow run is marked
    Crashed, the exit status is 143, and no partial output is left."""
    import psutil

    project = copy_project(tmp_path / "project")
    env = {k: v for k, v in project_env().items() if k != "MNIST_MIRROR"}
    with silent_server() as url:  # fetch waits on it
        edit_params(project, lambda raw: {**raw, "fetch": {**raw["fetch"], "mirrors": [url], "timeout_s": 300, "retries": 0}})
        command = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "fetch"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(command.stdout), daemon=True)
        reader.start()
        try:
            deadline, tag = time.monotonic() + 180, ""
            while not (tag and any(run.state.type == StateType.RUNNING for run, _ in flow_runs(tag))):
                assert command.poll() is None and time.monotonic() < deadline, "the fetch flow run never started"
                tag = next((line.split("runs tagged ")[1].split(")")[0] for line in lines if "runs tagged " in line), "")
                time.sleep(0.5)
            tree = descendants(command.pid)
            command.terminate()
            command.wait(timeout=120)
        finally:
            if command.poll() is None:
                command.kill()
            reader.join(timeout=10)
    output = "".join(lines)
    assert command.returncode == 143, output
    assert "stopped by SIGTERM" in output, output
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running: {alive}"
    runs = flow_runs(tag)
    assert runs and all(run.state.type in (StateType.CRASHED, StateType.FAILED) for run, _ in runs), runs
    assert not any((project / "data" / "raw").glob("*")), list((project / "data" / "raw").glob("*"))


def test_the_watchdog_restarts_a_dead_server_and_gives_up_on_one_that_keeps_dying(tmp_path: Path, capsys) -> None:
    """A server process that exits at once every time: restarted with growing waits, then left down with a message."""
    from pipeline.servers import Watchdog

    starts: list[float] = []

    def start() -> subprocess.Popen:
        starts.append(time.monotonic())
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    dog = Watchdog(
        start,
        start(),
        f"http://127.0.0.1:{free_port()}/health",
        "A test server",
        max_restarts=3,
        backoff_s=0.5,
        log=tmp_path / "server.log",
    )
    dog.start()
    dog.join(timeout=120)
    assert not dog.is_alive() and dog.gave_up and dog.restarts == 3
    waits = [b - a for a, b in pairwise(starts)]
    assert waits[1] >= 0.5 and waits[2] >= 1.0, waits  # at once, then after 0.5 s, then after 1 s (plus the polling)
    err = capsys.readouterr().err
    assert err.count("stopped (exit status 3); starting it again") == 3, err
    assert f"stopped 4 times within 300 s (last exit status 3); not starting it again: see {tmp_path / 'server.log'}" in err, err
    assert dog.stop().poll() == 3


@pytest.mark.pipeline
def test_mnist_run_is_one_flow_run_with_every_stage_nested(prefect_api: str, tmp_path: Path) -> None:
    """One `mnist run` is one flow run on the dashboard, `pipeline-run`, named after the run; each stage is a task
    run of it, and each stage that ran is a subflow of its task run, so the UI draws the run as one graph."""
    from test_faults import only_logreg

    project = copy_project(tmp_path / "project")
    edit_params(project, only_logreg)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mnist"), "run"],
        cwd=project,
        env={**project_env(), "PYTHONPATH": str(project)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run_id = done.stdout.split("runs tagged pipeline-run:", 1)[1].split(")")[0]
    stages = {"fetch", "preprocess", "train@logreg", "evaluate@logreg", "export@logreg", "report", "publish"}
    assert_one_graph(run_id, stages)


def assert_one_graph(run_id: str, stages: set[str]) -> None:
    """The pipeline run `run_id` is one `pipeline-run` flow run, Completed, with a Completed task run per stage,
    and each stage flow run (tagged with the run) is the subflow of one of those task runs."""
    with get_client(sync_client=True) as client:
        parents = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_id])))
    (parent,) = parents
    assert parent.state_name == "Completed", parent.state
    slots = task_runs(parent.id)
    assert set(slots) == stages
    assert all(slot.state_name in ("Completed", "Restored", "Up to date") for slot in slots.values()), slots
    children = [run for run, _ in flow_runs(run_tag(run_id))]
    assert {run.parent_task_run_id for run in children} <= {slot.id for slot in slots.values()}
    assert len(children) == sum(slot.state_name == "Completed" for slot in slots.values())


def test_a_bare_dvc_repro_is_one_flow_run_with_every_stage_nested(small_run: SmallRun) -> None:
    """The small run is a bare `dvc repro` reporting to the session's server: its stages nest under one flow run too."""
    from pipeline.dag import stages_in_order

    order, _ = stages_in_order(small_run.project)
    assert_one_graph(small_run.run_id, {name.rsplit(":", 1)[-1] for name in order})  # DVC names them from the cwd


def test_a_bare_dvc_repro_names_its_pipeline_run_after_the_dvc_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pipeline import stage, warm

    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    monkeypatch.delenv(EXPERIMENT_ENV, raising=False)
    monkeypatch.setenv(warm.LAUNCHED_BY_ENV, str(os.getpid()))
    first = stage.pipeline_run_id()
    assert first.startswith("repro-") and first.endswith(f"-{os.getpid()}") and stage.pipeline_run_id() == first
