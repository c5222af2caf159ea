"""A throwaway cluster on 127.0.0.1 for the fan-out (tests/test_fanout.py, benchmarks/fanout.py).

PostgreSQL 15 (Debian's `postgresql`), a Prefect server on it with basic authentication, an S3
server (moto, tests/s3.py) and a git daemon serving every project's bare origin, all on 127.0.0.1;
per project: a bare git origin at one commit, a bucket folder on the S3 server as its DVC
remote, the coordinator's clone, and `prefect worker start` processes. Everything is stopped and
removed on exit.

Each worker is a machine of its own that shares nothing with the others but the network:
it runs in its own network and mount namespaces (`unshare --net --mount`, as root). Its
network has its own 127.0.0.1, on which only the ports of the Prefect server, the S3 server
and the git daemon answer, each carried to the real one by socat through a Unix socket in
the worker's folder; its file system shows none of the cluster's folders (a tmpfs over them)
but its own, which holds its clone, its workspaces and its home. So a worker that reached
the coordinator's clone, the bare origin, another worker's workspace or PostgreSQL by path or
port would fail: the server and the remote are reached by address only.
"""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from unittest import mock
from urllib.parse import urlsplit

import httpx

from conftest import copy_project, edit_params, free_port, project_env
from s3 import REGION, S3_ENV, make_bucket, s3_server

BIN = Path(sys.executable).parent
AUTH = "mnist:loopback-secret"
COMMAND_TIMEOUT = 3600  # seconds for one command (a distributed run trains models)
WORKER_START_TIMEOUT = 120.0


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command; raise AssertionError showing its output unless it exits 0."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}) in {cwd}:\n{output[-5000:]}"
    return output


def auth_header() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()}


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does it)")
    return found[-1].parent


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on a free port of 127.0.0.1, removed on exit; yields Prefect's URL for its database."""
    pg = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(folder, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    try:
        run([*as_postgres, str(pg / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8"], folder, env)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
        run(
            [*as_postgres, str(pg / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o", options, "start"],
            folder,
            env,
        )
        psql = [str(pg / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-v", "ON_ERROR_STOP=1"]
        run([*psql, "-d", "postgres", "-c", "CREATE DATABASE prefect"], folder, env)
        run([*psql, "-d", "prefect", "-c", "CREATE EXTENSION IF NOT EXISTS pg_trgm"], folder, env)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*as_postgres, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], env=env, capture_output=True
            )
        shutil.rmtree(folder, ignore_errors=True)


def psql_value(database_url: str, query: str) -> str:
    """One value from the PostgreSQL database behind `database_url`."""
    port = database_url.split("@127.0.0.1:")[1].split("/")[0]
    psql = [str(postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", port, "-U", "prefect", "-d", "prefect", "-tAc", query]
    return run(psql, Path.cwd(), dict(os.environ)).strip()


def stop_tree(process: subprocess.Popen, sig: signal.Signals = signal.SIGTERM, wait_s: float = 20) -> None:
    """Send `sig` to a worker and every process under it (Prefect starts each flow run in a session
    of its own), then SIGKILL whatever is left after `wait_s`."""
    import psutil

    from pipeline.servers import forward

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    forward(process.pid, sig)
    _, alive = psutil.wait_procs(tree, timeout=wait_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    process.poll()


@dataclass
class Project:
    """One commit of the project on a bare origin, a DVC remote, and the coordinator's clone."""

    root: Path
    origin: Path
    remote: str  # a folder, or an s3:// URL on the cluster's S3 server
    commit: str
    coordinator: Path


@dataclass
class Loopback:
    """A Prefect server (PostgreSQL, basic auth) and what a fan-out needs around it."""

    root: Path
    api: str
    database_url: str
    stack: ExitStack
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    s3_endpoint: str | None = None
    git_port: int | None = None

    def env(self, workspace: Path | None = None, **extra: str) -> dict[str, str]:
        """A client's environment: this server, with its auth string, and the S3 server's keys."""
        env = project_env(PREFECT_API_URL=self.api, PREFECT_API_AUTH_STRING=AUTH, **S3_ENV, **extra)
        if workspace is not None:
            env["PYTHONPATH"] = str(workspace)
        return env

    def s3(self) -> str:
        """The endpoint of the cluster's S3 server (moto, tests/s3.py), started the first time, with a bucket `mnist`."""
        if self.s3_endpoint is None:
            self.s3_endpoint = self.stack.enter_context(s3_server(self.root / "moto.log"))
            make_bucket(self.s3_endpoint, "mnist")
        return self.s3_endpoint

    def git_daemon(self) -> int:
        """The port of the cluster's git daemon, started the first time: it serves the repositories under the
        cluster's root, and accepts pushes (workers push DVC experiments)."""
        if self.git_port is None:
            port = free_port()
            log = open(self.root / "git-daemon.log", "wb")
            self.stack.callback(log.close)
            daemon = subprocess.Popen(
                [
                    "git",
                    "daemon",
                    "--listen=127.0.0.1",
                    f"--port={port}",
                    f"--base-path={self.root}",
                    "--export-all",
                    "--enable=receive-pack",
                    "--reuseaddr",
                    "--informative-errors",
                    str(self.root),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.stack.callback(stop_tree, daemon)
            wait_for_port(port, 30)
            self.git_port = port
        return self.git_port

    def git_url(self, bare: Path) -> str:
        """The git:// URL of `bare`, a repository under the cluster's root, on the cluster's git daemon."""
        return f"git://127.0.0.1:{self.git_daemon()}/{bare.relative_to(self.root)}"

    def project(self, name: str, edit: Callable[[dict], dict]) -> Project:
        """The project with params edited by `edit`, committed without dvc.lock, on a bare origin that the
        coordinator's clone reaches through the git daemon; its default DVC remote is s3://mnist/<name> on the
        cluster's S3 server (its endpoint URL and region in the coordinator's config.local, its keys in the environment)."""
        root = self.root / name
        source = copy_project(root / "source")
        edit_params(source, edit)
        subprocess.run(["git", "rm", "-q", "--cached", "dvc.lock"], cwd=source, check=True)
        (source / "dvc.lock").unlink()
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", name], cwd=source, check=True)
        origin = root / "origin.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(source), str(origin)], check=True)
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True
        ).stdout.strip()
        coordinator = clone(origin, root / "coordinator")
        subprocess.run(["git", "remote", "set-url", "origin", self.git_url(origin)], cwd=coordinator, check=True)
        remote = f"s3://mnist/{name}"
        run(["dvc", "remote", "add", "--local", "-d", "shared", remote], coordinator, self.env(coordinator))
        for key, value in (("endpointurl", self.s3()), ("region", REGION)):
            run(["dvc", "remote", "modify", "--local", "shared", key, value], coordinator, self.env(coordinator))
        return Project(root, origin, remote, commit, coordinator)

    def start_workers(self, project: Project, pool: str, names: list[str]) -> None:
        """`prefect worker start --pool POOL --limit 1` per name, each a machine of its own (`isolated`) with its own
        clone; wait until all have reported."""
        for name in names:
            own = host(project, name)
            folder = clone(project.origin, own / "clone")
            (own / "home").mkdir()
            log = open(project.root / f"{name}.log", "wb")
            self.stack.callback(log.close)
            command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1", "--name", name]
            env = self.env(
                PREFECT_WORKER_QUERY_SECONDS="2",
                HOME=str(own / "home"),
                PREFECT_HOME=str(own / "home" / ".prefect"),
                MNIST_WORKSPACES=str(workspaces(project, name)),
            )
            self.workers[name] = self.isolated(own, folder, command, env, log)
            self.stack.callback(stop_tree, self.workers[name])
        wait_for_workers(self.api, pool, names, WORKER_START_TIMEOUT)

    def isolated(self, own: Path, cwd: Path, command: list[str], env: dict[str, str], log: IO[bytes]) -> subprocess.Popen:
        """`command` started in network and mount namespaces of its own, where only `own` of the cluster's folders
        shows and only the servers' ports answer on 127.0.0.1 (the module's docstring)."""
        ports = [urlsplit(self.api).port, urlsplit(self.s3()).port, self.git_daemon()]
        (own / "net").mkdir(exist_ok=True)
        for port in ports:  # the real server's end of each port, outside the namespaces
            forward = subprocess.Popen(
                ["socat", f"UNIX-LISTEN:{own}/net/{port}.sock,fork,unlink-early", f"TCP:127.0.0.1:{port}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.stack.callback(stop_tree, forward)
            wait_for_path(own / "net" / f"{port}.sock", 30)
        stage = Path(tempfile.mkdtemp(prefix=f"mnist-{own.name}-"))  # outside the root: holds `own` while the root is covered
        self.stack.callback(shutil.rmtree, stage, True)
        listen = [f"socat TCP-LISTEN:{p},bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:{own}/net/{p}.sock &" for p in ports]
        ready = [f"until (exec 3<>/dev/tcp/127.0.0.1/{p}) 2>/dev/null; do sleep 0.1; done" for p in ports]
        script = "\n".join(
            [
                "set -e",
                "ip link set lo up",
                f"mount --bind {own} {stage}",
                f"mount -t tmpfs -o size=1m tmpfs {self.root}",
                f"mkdir -p {own}",
                f"mount --move {stage} {own}",
                *listen,
                *ready,
                f"cd {cwd}",
                "exec " + " ".join(shlex.quote(part) for part in command),
            ]
        )
        return subprocess.Popen(
            ["unshare", "--net", "--mount", "--fork", "--kill-child", "bash", "-c", script],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )

    def flow_runs(self, tag: str | None = None) -> list[dict]:
        """The server's flow runs (with `tag`, if given), as the API returns them."""
        body: dict = {"limit": 200}
        if tag:
            body["flow_runs"] = {"tags": {"all_": [tag]}}
        reply = httpx.post(f"{self.api}/flow_runs/filter", json=body, headers=auth_header(), timeout=30)
        reply.raise_for_status()
        return reply.json()


def stop_leftovers(root: Path) -> None:
    """Stop the processes working in a folder under `root` that outlived the workers: the warm stage servers
    that chains keep in their workspaces for the next chains (they would otherwise wait out their idle time)."""
    import psutil

    left = []
    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd") or ""
        if cwd == str(root) or cwd.startswith(f"{root}/"):
            left.append(proc)
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=20)
    for proc in alive:
        proc.kill()


def host(project: Project, worker: str) -> Path:
    """`worker`'s own folder, the only one of the cluster's that it sees: its clone, workspaces, home."""
    return project.root.parent / "hosts" / f"{project.root.name}-{worker}"


def workspaces(project: Project, worker: str) -> Path:
    """The folder where `worker` keeps its workspaces of `project` (pipeline/fanout.py chain_workspace)."""
    return host(project, worker) / "workspaces"


def in_namespaces(worker: subprocess.Popen, command: list[str]) -> subprocess.CompletedProcess:
    """`command` run in the network and mount namespaces of a worker that Loopback.isolated started."""
    import psutil

    (inside,) = psutil.Process(worker.pid).children()  # unshare's child: the worker, in the namespaces
    return subprocess.run(["nsenter", "-t", str(inside.pid), "-n", "-m", *command], capture_output=True, text=True)


def wait_for_port(port: int, timeout_s: float) -> None:
    """Until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s") from None
            time.sleep(0.1)


def wait_for_path(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s:.0f} s"
        time.sleep(0.05)


def clone(origin: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True, capture_output=True)
    return dest


def wait_for_workers(api: str, pool: str, names: list[str], timeout_s: float) -> None:
    """Until every named worker has reported to `pool` (its first heartbeat)."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        reply = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, headers=auth_header(), timeout=10)
        if reply.status_code == 200:
            seen = {w["name"] for w in reply.json()}
            if set(names) <= seen:
                return
        time.sleep(1)
    raise AssertionError(f"workers {sorted(set(names) - seen)} did not report to pool {pool} within {timeout_s:.0f} s")


@contextmanager
def loopback(root: Path) -> Iterator[Loopback]:
    """PostgreSQL and a Prefect server on it with basic authentication, both on 127.0.0.1; stopped on exit."""
    from pipeline import servers

    with ExitStack() as stack:
        stack.callback(stop_leftovers, root)  # last, once the workers are stopped
        database_url = stack.enter_context(postgres())
        with mock.patch.dict(os.environ, {servers.AUTH_ENV: AUTH, "PREFECT_HOME": str(root / "prefect-home")}):
            api = stack.enter_context(
                servers.prefect_server("127.0.0.1", free_port(), log=root / "server.log", database_url=database_url)
            )
        yield Loopback(root, api, database_url, stack)
