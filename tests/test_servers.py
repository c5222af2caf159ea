"""Who gets the runs and the credentials: the project's own Prefect server, never a stranger on its port.

Each test starts what it needs on a free port of 127.0.0.1 with its own PREFECT_HOME; the real
Prefect server takes 10 to 20 s to start on 2 cores.
"""

from __future__ import annotations

import http.server
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from conftest import copy_project, edit_params, free_port, project_env
from helpers import serve_handler
from pipeline import localserver, servers, stage  # stage imports TensorFlow: at collection, not under capture
from test_faults import only_logreg


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PREFECT_HOME of the test's own, and no auth string or API URL from outside."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    for name in (servers.AUTH_ENV, localserver.CLIENT_AUTH_ENV, "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "prefect-home"


def test_a_server_the_project_starts_asks_for_a_random_auth_string(home: Path) -> None:
    port = free_port()
    with servers.prefect_server("127.0.0.1", port) as api:
        auth = os.environ[localserver.CLIENT_AUTH_ENV]
        assert auth.startswith("mnist:") and len(auth) > 30
        assert httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).status_code == 401
        user, password = auth.split(":", 1)
        assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=(user, password), timeout=30).status_code == 200
        record = home / "mnist-servers" / f"{port}.json"
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        assert stat.S_IMODE(record.parent.stat().st_mode) == 0o700
        assert localserver.ours(port) == localserver.read(port) and localserver.read(port).auth == auth
    assert localserver.CLIENT_AUTH_ENV not in os.environ
    assert not record.exists()
    assert not servers.answers(f"{api}/health")


class Squatter(http.server.BaseHTTPRequestHandler):
    """Answers every request with 200 `true`, as a Prefect server's /health does, and notes its headers."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:  # http.server's naming
        self.seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"true")

    do_POST = do_GET  # noqa: N815 - http.server's naming

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


@pytest.fixture
def squatter() -> Iterator[int]:
    Squatter.seen = []
    with serve_handler(Squatter) as url:
        yield int(url.rstrip("/").rsplit(":", 1)[1])


def test_a_stranger_on_the_port_is_named_and_gets_nothing(home: Path, squatter: int) -> None:
    with pytest.raises(servers.Stranger) as refused:
        with servers.prefect_server("127.0.0.1", squatter):
            pytest.fail("the squatter was taken for the project's server")
    assert f"Something answers on 127.0.0.1:{squatter}" in str(refused.value)
    assert f"PID {os.getpid()}" in str(refused.value)  # the squatter runs in this process
    assert not any("Authorization" in headers for headers in Squatter.seen)
    assert localserver.CLIENT_AUTH_ENV not in os.environ


def test_a_stage_does_not_report_to_a_stranger_on_the_dashboards_port(
    home: Path, squatter: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(stage, "DASHBOARDS_API_URL", f"http://127.0.0.1:{squatter}/api")
    assert stage.dashboards_api() is None
    assert "is not a server this project started" in capsys.readouterr().err
    assert not any("Authorization" in headers for headers in Squatter.seen)


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline import localserver, servers, stage  # stage imports TensorFlow: at collection, not under capture
    port, done = int(sys.argv[1]), Path(sys.argv[2])
    with servers.prefect_server("127.0.0.1", port) as api:
        print("serving", localserver.read(port).pid, flush=True)
        while not done.exists():
            time.sleep(0.1)
    print("ended", flush=True)
""")


def serving(holder: subprocess.Popen) -> tuple[int, bool]:
    """Read a holder's output up to its `serving PID` line: (the server's PID, whether it started it)."""
    started = False
    for line in holder.stdout:
        started |= "started a server" in line
        if line.startswith("serving "):
            return int(line.split()[1]), started
    raise AssertionError(f"the holder ended: {holder.stderr.read()[-3000:]}")


def test_two_commands_starting_at_once_share_one_server_until_both_end(home: Path, tmp_path: Path) -> None:
    port, api = free_port(), None
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    done = [tmp_path / "0-done", tmp_path / "1-done"]
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(port), str(d)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for d in done
    ]
    try:
        (pid0, started0), (pid1, started1) = serving(holders[0]), serving(holders[1])
        assert pid0 == pid1 and started0 != started1  # one server, started by one of them
        starter, user = (0, 1) if started0 else (1, 0)
        done[starter].touch()  # the starter ends first: the server stays while the other uses it
        assert "other commands still use the server" in holders[starter].stderr.readline()
        assert servers.answers(f"{api}/health") and holders[starter].poll() is None
        done[user].touch()
        assert holders[user].wait(timeout=60) == 0 and holders[starter].wait(timeout=60) == 0
        assert not servers.answers(f"{api}/health")
        assert not Path(f"/proc/{pid0}").exists()
    finally:
        for h in holders:
            h.kill()


def test_two_mnist_runs_in_two_workspaces_without_a_server_share_one(home: Path, tmp_path: Path) -> None:
    """Two `mnist run` at once, no PREFECT_API_URL: one starts the server, the other uses it, both finish,
    and the server goes when the last one ends."""
    port = free_port()  # never 4200: another suite's server may be there
    env = project_env(PREFECT_HOME=str(home), **{localserver.PORT_ENV: str(port)})
    env.pop("PREFECT_API_URL", None)
    runs = []
    for name in ("one", "two"):
        project = copy_project(tmp_path / name)
        edit_params(project, only_logreg)
        runs.append(
            subprocess.Popen(
                ["mnist", "run"],
                cwd=project,
                env={**env, "PYTHONPATH": str(project)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-4000:]
        # where the run is, stage by stage, and the models at the end (pipeline/progress.py)
        assert re.search(r"^\[3/7\] train@logreg: ran, [\d.]+ s$", output, re.MULTILINE), output[-4000:]
        assert re.search(r"^\[7/7\] \S+: ran", output, re.MULTILINE), output[-4000:]
        assert re.search(r"^logreg\s+0\.\d{4}\s+0\.0500\s+yes\s+1$", output, re.MULTILINE), output[-4000:]
        assert "Running stage" not in output and "> python -m pipeline.warm" not in output
    assert sum(f"Prefect: started a server on 127.0.0.1:{port}" in output for output in outputs) == 1, outputs
    assert localserver.read(port) is None
    assert not servers.answers(f"http://127.0.0.1:{port}/api/health")


def test_mnist_run_killed_outright_takes_dvc_and_its_stage_with_it(home: Path, tmp_path: Path) -> None:
    import psutil

    project = copy_project(tmp_path / "project")
    edit_params(project, only_logreg)
    env = {**project_env(PREFECT_HOME=str(home), **{localserver.PORT_ENV: str(free_port())}), "PYTHONPATH": str(project)}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen(["mnist", "run", "--cold"], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def in_project() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cwd", "cmdline"]):
            if proc.info["cwd"] == str(project) and proc.pid != run.pid:
                found.append(proc)
        return found

    deadline = time.monotonic() + 600
    while not any("stages/" in " ".join(p.info["cmdline"] or []) for p in in_project()):
        assert run.poll() is None and time.monotonic() < deadline, "no stage started"
        time.sleep(0.2)
    run.kill()
    run.wait()
    # at once, not when a stage gives up on the server that went with the command (30 s: stage.SERVER_WAIT_S)
    deadline = time.monotonic() + 20
    while left := [p for p in in_project() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, [" ".join(p.info["cmdline"] or []) for p in left]
        time.sleep(0.2)


def test_the_keeper_looks_for_killed_stages_while_stages_use_its_server(tmp_path: Path) -> None:
    """wait_idle calls its `every` while a stage holds the users file, and returns once none has for idle_s."""
    import fcntl
    import threading

    users, calls, released = tmp_path / "users", [], threading.Event()
    users.touch()

    def stage_holding_the_server() -> None:
        fd = os.open(users, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        deadline = time.monotonic() + 60
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.close(fd)
        released.set()

    holder = threading.Thread(target=stage_holding_the_server)
    holder.start()
    with servers.Signals() as signals:
        reason = servers.wait_idle(users, 1.0, signals, every=lambda: calls.append(time.monotonic()), every_s=0.3)
    holder.join()
    assert released.is_set() and len(calls) >= 2 and reason == "no stage or command used it for 1 s", (calls, reason)
