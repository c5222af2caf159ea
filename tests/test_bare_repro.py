"""A bare `dvc repro` (no PREFECT_API_URL): its first stage starts the project's Prefect server and a warm
stage server in the background, every stage and later runs use them, and they stop after the idle time
or with `mnist dashboards --stop` (pipeline/stage.py reporting_api, pipeline/servers.py keep,
pipeline/warm.py background).

The project copy runs the logreg model alone (7 stages, 1,500 images, one epoch), with its own
PREFECT_HOME and a free port ($MNIST_PREFECT_PORT), so nothing here touches 127.0.0.1:4200 or another
test's server. Every process the runs leave is found by that PREFECT_HOME in its environment and
killed at the end, whatever happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conftest import copy_project, dvc, edit_params, free_port, project_env
from pipeline import localserver
from test_faults import only_logreg

STAGES = {"fetch", "preprocess", "train@logreg", "evaluate@logreg", "export@logreg", "report", "publish"}
CLEARED = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING", "PIPELINE_RUN_ID")


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@dataclass
class Bare:
    project: Path
    home: Path
    port: int

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a bare `dvc repro` in the project: no Prefect server configured."""
        env = project_env(PREFECT_HOME=str(self.home), **{localserver.PORT_ENV: str(self.port)}, **extra)
        for name in CLEARED:
            env.pop(name, None)
        env.pop("SHELL", None)  # DVC then runs each command with /bin/sh -c: dash, which stays the stage's parent
        env["PYTHONPATH"] = str(self.project)
        return env

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def records(self) -> Path:
        return self.home / "mnist-servers"

    @contextmanager
    def in_home(self) -> Iterator[None]:
        """pipeline.localserver reads $PREFECT_HOME: this test's, for the block."""
        saved = os.environ["PREFECT_HOME"]
        os.environ["PREFECT_HOME"] = str(self.home)
        try:
            yield
        finally:
            os.environ["PREFECT_HOME"] = saved

    def server(self) -> localserver.Record | None:
        """The record of the project's Prefect server on the test's port, if it is the one listening there."""
        with self.in_home():
            return localserver.ours(self.port)

    def processes(self) -> list[psutil.Process]:
        """Every running process with this test's PREFECT_HOME in its environment: what the runs started."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("PREFECT_HOME") == str(self.home) and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    def prefect_servers(self) -> list[psutil.Process]:
        return [p for p in self.processes() if _cmdline(p)[-6:-4] == ["server", "start"]]

    def keeper(self) -> dict[str, Any]:
        record = localserver.read_json(self.records() / f"{self.port}.keeper.json")
        assert record, "no keeper recorded"
        return record

    def warm(self) -> dict[str, Any]:
        records = [localserver.read_json(p) for p in self.records().glob("warm-*.json")]
        assert len(records) == 1 and records[0], records
        return records[0]

    def get(self, what: str) -> list[dict[str, Any]]:
        """Every flow run or task run the project's server holds, through its API with the recorded auth string."""
        record = self.server()
        assert record and record.auth, "no server of the project answers, or its record has no auth string"
        user, password = record.auth.split(":", 1)
        answer = httpx.post(f"{self.api}/{what}/filter", json={"limit": 200}, auth=(user, password), timeout=30)
        answer.raise_for_status()
        return answer.json()

    def stop(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "dashboards", "--stop"],
            cwd=self.project,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bare]:
    root = tmp_path_factory.mktemp("bare")
    project = copy_project(root / "project")
    edit_params(project, only_logreg)
    setup = Bare(project, root / "prefect-home", free_port())
    try:
        yield setup
    finally:
        left = setup.processes()
        for proc in left:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=30)


@pytest.fixture(scope="module")
def first_run(bare: Bare) -> str:
    """A bare `dvc repro` of the whole pipeline; its output."""
    done = dvc(bare.project, "repro", env=bare.env(**{localserver.IDLE_ENV: "600"}))
    return done.stdout + done.stderr


def test_a_bare_repro_starts_one_server_for_all_its_stages(bare: Bare, first_run: str) -> None:
    started = [line for line in first_run.splitlines() if line.startswith("Started in the background")]
    assert len(started) == 1, first_run[-4000:]
    assert f"http://127.0.0.1:{bare.port}" in started[0] and "mnist dashboards --stop" in started[0]
    assert "10 min without a stage" in started[0] and f"auth string in {bare.records() / f'{bare.port}.json'}" in started[0]
    assert bare.server().auth not in first_run  # the auth string stays out of the run's output
    # one Prefect server, kept by one keeper, and one warm stage server for the project, all still running
    servers = bare.prefect_servers()
    assert len(servers) == 1, [_cmdline(p) for p in bare.processes()]
    assert bare.server() is not None
    keeper = psutil.Process(bare.keeper()["pid"])
    assert servers[0].pid in {c.pid for c in keeper.children(recursive=True)}
    assert bare.warm()["root"] == str(bare.project.resolve())
    # every stage's flow run is on that server, nested under one parent flow run of the pipeline run
    runs = bare.get("flow_runs")
    parents = [r for r in runs if r["name"].startswith("repro-")]
    assert len(parents) == 1 and parents[0]["state_type"] == "COMPLETED", [(r["name"], r["state_type"]) for r in runs]
    slots = {t["id"]: t for t in bare.get("task_runs")}
    stages = [r for r in runs if any(tag.startswith("stage:") for tag in r["tags"])]
    assert {slots[r["parent_task_run_id"]]["name"] for r in stages} == STAGES
    assert all(slots[r["parent_task_run_id"]]["flow_run_id"] == parents[0]["id"] for r in stages)
    assert all(f"pipeline-run:{parents[0]['name']}" in r["tags"] for r in stages)
    starts = {r["name"]: r["labels"].get("mnist.start") for r in stages}
    assert starts["fetch"] == "cold" and "warm" in starts.values(), starts  # the warm server is ready after the first stage


def test_a_later_repro_uses_the_running_servers(bare: Bare, first_run: str) -> None:
    keeper, server, warm = bare.keeper()["pid"], bare.server(), bare.warm()["pid"]
    done = dvc(bare.project, "repro", "--force", "--single-item", "fetch", env=bare.env())
    assert "Started in the background" not in done.stderr, done.stderr[-3000:]
    assert bare.keeper()["pid"] == keeper and bare.server() == server and bare.warm()["pid"] == warm
    assert len(bare.prefect_servers()) == 1
    fetches = [r for r in bare.get("flow_runs") if r["name"] == "fetch"]
    assert len(fetches) == 2 and {r["labels"].get("mnist.start") for r in fetches} == {"cold", "warm"}
    assert len([r for r in bare.get("flow_runs") if r["name"].startswith("repro-")]) == 2


def test_mnist_dashboards_stop_stops_what_the_runs_started(bare: Bare, first_run: str) -> None:
    keeper, warm = bare.keeper()["pid"], bare.warm()["pid"]
    done = bare.stop()
    assert done.returncode == 0, done.stderr
    assert f"stopped the Prefect server on 127.0.0.1:{bare.port} (PID {keeper})" in done.stdout, done.stdout
    assert f"stopped the warm stage server of {bare.project.resolve()} (PID {warm})" in done.stdout, done.stdout
    assert bare.processes() == [] and bare.server() is None
    assert not list(bare.records().glob("*.json"))
    assert "nothing to stop" in bare.stop().stdout


def test_the_background_servers_stop_after_the_idle_time(bare: Bare, first_run: str) -> None:
    bare.stop()  # whatever an earlier test left running
    done = dvc(bare.project, "repro", "--force", "--single-item", "fetch", env=bare.env(**{localserver.IDLE_ENV: "3"}))
    assert "they stop after 3 s without a stage, or now with `mnist dashboards --stop`" in done.stderr, done.stderr[-3000:]
    wait_for(lambda: not bare.processes(), "the background servers to stop after 3 s without a stage")
    assert bare.server() is None and not list(bare.records().glob("*.json"))
    log = (bare.records() / f"{bare.port}.keeper.log").read_text()
    assert "stopping the server: no stage or command used it for 3 s" in log, log[-3000:]
